"""Records in memory-mapped columns (tasks/records.py): exact round trips for every task's splits,
the record cache (warm, changed source, corrupt, concurrent builders), pickling and memory."""

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tasks.base import DataError, list_tasks
from tasks.records import RecordStore, StoreError, cache_folder, cached_read
from tasks.router import TaskRouter
from tasks.synthetic import generate

REPO = Path(__file__).resolve().parents[1]


def typed(value):
    """``value`` with the type of every part spelled out: 1 == 1.0 == True, but not here."""
    if isinstance(value, dict):
        return dict, [(typed(k), typed(v)) for k, v in value.items()]
    if isinstance(value, list):
        return list, [typed(v) for v in value]
    return type(value), value


def column_specs(folder: Path) -> dict:
    """Each key's column spec, as columns.json has it."""
    layout = json.loads((folder / "columns.json").read_text())
    return {column["key"]: column["spec"] for column in layout["columns"]}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=24, seed=0, size=32)
    return TaskRouter.from_yaml(root / "tasks.yaml", cache_dir=False)  # the readers' own lists


@pytest.mark.parametrize("name", list_tasks())
def test_a_cached_router_reads_what_the_readers_read(router, name, tmp_path):
    """Every split of every task through the record cache (cold, then warm) equals the readers'
    records, value by value and type by type; the Karpathy VQA splits are views of the cached
    official splits (no copy of their records)."""
    from tasks.records import Subset

    yaml_file = Path(router[name].root).parent / "tasks.yaml"
    for attempt in ("cold", "warm"):
        cached = TaskRouter.from_yaml(yaml_file, cache_dir=tmp_path / "cache")
        for split in router[name].config.splits:
            records = router[name].read(split)
            got = cached[name].read(split)
            assert not isinstance(got, list), (attempt, split)  # a store or a view
            assert typed(list(got)) == typed(records), (attempt, split)
            if name == "vqa":  # karpathy_{train,val,test}
                assert isinstance(got, Subset)


@pytest.mark.parametrize("name", list_tasks())
def test_every_split_of_every_task_round_trips_exactly(router, name, tmp_path):
    assert name in router.tasks, f"the synthetic set has no {name} task"
    for split in router[name].config.splits:
        records = router[name].read(split)
        store = RecordStore.write(records, tmp_path / split)
        assert len(store) == len(records)
        assert list(store) == records
        assert typed(list(store)) == typed(records)
        assert typed(store[-1]) == typed(records[-1])
        assert typed(store[1:3]) == typed(records[1:3])
        again = pickle.loads(pickle.dumps(store))
        assert typed(list(again)) == typed(records)


def test_hard_columns_round_trip_exactly(tmp_path):
    records = [
        {"id": 1, "score": 0.5, "ok": True, "mixed": 1, "huge": 2**70, "text": "é\ud800",
         "images": [Path("a/b.jpg")], "nested": [[1, 2], []], "maybe": None,
         "label": {"yes": 1.0, "no": 0.3}, "types": {"a": "x"}, "counts": {"k": 3}},
        {"id": -(2**63), "score": 1.0, "ok": False, "mixed": "one", "huge": 1, "text": "",
         "images": [Path("a/b.jpg"), Path("c.png")], "nested": [[3]], "maybe": 2,
         "label": {}, "types": {}, "counts": {}, "only_here": [None, 1]},
        {"id": 3, "score": -0.0, "ok": True, "mixed": [1, "a"], "huge": 0, "text": "x",
         "images": [], "nested": [], "maybe": None, "label": {"yes": 0.0},
         "types": {"b": "y"}, "counts": {"k": 1, "j": 2}},
        {"id": 4, "score": 1e300, "ok": False, "mixed": {"a": None}, "huge": -1, "text": "x",
         "images": [Path("c.png")], "nested": [[]], "label": {}, "types": {"a": "x"},
         "counts": {}, "nothing": None},
    ]  # fmt: skip
    store = RecordStore.write(records, tmp_path / "store")
    assert typed(list(store)) == typed(records)
    kinds = {key: spec["kind"] for key, spec in column_specs(tmp_path / "store").items()}
    assert kinds["mixed"] == "json" and kinds["huge"] == "json" and kinds["nothing"] == "null"
    assert kinds["images"] == "list" and kinds["label"] == "dict" and kinds["id"] == "int"
    assert "maybe" not in records[3] and "maybe" not in store[3]  # absent stays absent


def test_what_json_cannot_keep_is_refused(tmp_path):
    with pytest.raises(TypeError, match="images"):
        RecordStore.write([{"images": Path("a")}, {"images": "a"}], tmp_path / "s")
    with pytest.raises(TypeError, match="pair"):
        RecordStore.write([{"pair": (1, 2)}], tmp_path / "t")


def test_repeated_strings_are_categorical_and_distinct_reads_the_table(router, tmp_path):
    records = router["vqa"].read("train")
    store = RecordStore.write(records, tmp_path / "vqa")
    columns = column_specs(tmp_path / "vqa")
    assert columns["source"]["kind"] == "cat" and columns["answer_type"]["kind"] == "cat"
    assert columns["images"]["items"]["kind"] == "cat"
    images = list(dict.fromkeys(p for r in records for p in r["images"]))
    assert store.distinct("images") == images and all(isinstance(p, Path) for p in images)
    assert store.distinct("source") == list(dict.fromkeys(r["source"] for r in records))
    assert store.distinct("question") == list(dict.fromkeys(r["question"] for r in records))
    with pytest.raises(TypeError):
        store.distinct("id")


def test_arrays_are_memory_maps_and_nothing_is_pickled(router, tmp_path):
    store = RecordStore.write(router["gqa"].read("train"), tmp_path / "gqa")
    assert store.arrays and all(isinstance(a, np.memmap) for a in store.arrays.values())
    for path in (tmp_path / "gqa").glob("*.npy"):
        assert np.load(path, allow_pickle=False).dtype != object
    source = (REPO / "tasks/records.py").read_text()
    calls = re.findall(r"np\.(?:save|load)\([^)]*\)", source)
    assert len(calls) == 2 and all("allow_pickle=False" in call for call in calls)
    assert "allow_pickle=" + "True" not in source and "import pickle" not in source
    state = pickle.dumps(store)
    assert len(state) < 200 + len(str(tmp_path)), "a pickled store carries its folder only"


def test_reading_records_keeps_nothing(router, tmp_path):
    store = RecordStore.write(router["vqa"].read("train") * 50, tmp_path / "vqa")
    for _ in store:  # warm up whatever is built once (numpy's caches)
        pass
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for record in store:
        del record
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 20_000, f"{grown} bytes kept after reading {len(store)} records"


def test_a_missing_or_broken_store_is_a_data_error(router, tmp_path):
    assert issubclass(StoreError, DataError)
    with pytest.raises(StoreError):
        RecordStore.open(tmp_path / "nothing")
    RecordStore.write(router["nlvr2"].read("train"), tmp_path / "s")
    with open(tmp_path / "s/sentence.bytes.npy", "r+b") as f:
        f.truncate(150)
    with pytest.raises(StoreError, match="sentence.bytes"):
        RecordStore.open(tmp_path / "s")


def test_writing_where_a_store_appeared_keeps_the_first(router, tmp_path):
    first = RecordStore.write(router["gqa"].read("train"), tmp_path / "s")
    second = RecordStore.write(router["gqa"].read("val"), tmp_path / "s")
    assert list(second) == list(first) == router["gqa"].read("train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "no temporary folder is left"


# -- the record cache ------------------------------------------------------------------------------
class Reader:
    """Reads a JSON Lines file of records, counting its calls."""

    def __init__(self, path: Path) -> None:
        self.path, self.calls = path, 0

    def __call__(self):
        self.calls += 1
        rows = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [{**r, "source": str(self.path)} for r in rows], [self.path]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"id": i, "q": f"q{i}"}) + "\n" for i in range(5)))
    return path


IDENTITY = {"reader": "test", "version": 1, "split": "train", "root": "/r", "options": {}}


def rebuilds(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vlpeft.records"]


def test_a_warm_cache_does_not_read(source, tmp_path, caplog):
    caplog.set_level(logging.INFO, "vlpeft.records")
    read = Reader(source)
    cold = cached_read(tmp_path / "cache", IDENTITY, read)
    warm = cached_read(tmp_path / "cache", dict(reversed(IDENTITY.items())), read)
    assert read.calls == 1 and list(warm) == list(cold) == read()[0]
    assert len(rebuilds(caplog)) == 1 and "no cache yet" in rebuilds(caplog)[0]
    meta = json.loads((cache_folder(tmp_path / "cache", IDENTITY) / "meta.json").read_text())
    assert meta["identity"] == IDENTITY and list(meta["sources"]) == [str(source)]
    other = cached_read(tmp_path / "cache", {**IDENTITY, "split": "val"}, read)
    assert read.calls == 3 and len(other) == 5


def test_a_changed_source_is_read_again(source, tmp_path, caplog):
    read = Reader(source)
    cached_read(tmp_path / "cache", IDENTITY, read)
    source.write_text(source.read_text().replace("q3", "Q3"))  # same size, other bytes
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    caplog.set_level(logging.INFO, "vlpeft.records")
    store = cached_read(tmp_path / "cache", IDENTITY, read)
    assert read.calls == 2 and store[3]["q"] == "Q3"
    (message,) = rebuilds(caplog)
    assert f"source {source} changed" in message and "head_tail_sha256" in message
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # touched only
    cached_read(tmp_path / "cache", IDENTITY, read)
    assert read.calls == 3


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda folder: (folder / "meta.json").unlink(), "meta.json is missing"),
        (lambda folder: (folder / "meta.json").write_text("{"), "meta.json is unreadable"),
        (lambda folder: os.truncate(folder / "q.bytes.npy", 140), "do not open"),
        (lambda folder: (folder / "columns.json").unlink(), "do not open"),
    ],
)
def test_a_corrupt_or_partial_cache_is_rebuilt(source, tmp_path, caplog, damage, why):
    read = Reader(source)
    cached_read(tmp_path / "cache", IDENTITY, read)
    damage(cache_folder(tmp_path / "cache", IDENTITY))
    caplog.set_level(logging.INFO, "vlpeft.records")
    store = cached_read(tmp_path / "cache", IDENTITY, read)
    assert read.calls == 2 and list(store) == read()[0]
    (message,) = rebuilds(caplog)
    assert why in message
    assert list(cached_read(tmp_path / "cache", IDENTITY, read)) == list(store)
    assert read.calls == 3, "the rebuilt cache is warm"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")) == []


def test_bad_input_passes_through_and_caches_nothing(tmp_path):
    def read():
        raise DataError("data.jsonl: line 3: malformed JSON")

    with pytest.raises(DataError, match="line 3"):
        cached_read(tmp_path / "cache", IDENTITY, read)
    assert not cache_folder(tmp_path / "cache", IDENTITY).exists()


BUILDER = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tasks.records import cached_read

source, log = Path({source!r}), Path({log!r})
def read():
    with open(log, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(1.0)  # both processes are in here at once unless one waits for the other
    return [json.loads(line) for line in source.read_text().splitlines()], [source]

store = cached_read(Path({cache!r}), {identity!r}, read)
print(json.dumps(list(store)))
"""


@pytest.mark.slow
def test_two_processes_building_one_cache_give_one_good_cache(source, tmp_path):
    log = tmp_path / "reads.log"
    code = textwrap.dedent(BUILDER).format(
        repo=str(REPO), source=str(source), log=str(log), cache=str(tmp_path / "cache"),
        identity=IDENTITY,
    )  # fmt: skip
    builders = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [b.communicate(timeout=300)[0] for b in builders]
    assert [b.returncode for b in builders] == [0, 0]
    expected = [json.loads(line) for line in source.read_text().splitlines()]
    assert [json.loads(out) for out in outputs] == [expected, expected]
    assert len(log.read_text().split()) == 1, "the second builder waited and mapped the first's"
    folder = cache_folder(tmp_path / "cache", IDENTITY)
    assert list(RecordStore.open(folder)) == expected
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == [folder.name, f"{folder.name}.lock"], "no temporary folder is left"
