"""Browser tests of the web page (a package, so its conftest does not replace the `conftest` module that
tests/serve imports from)."""
