"""vlpeft launch layer (see DESIGN.md)."""
