"""vlpeft evaluation layer (see DESIGN.md)."""
