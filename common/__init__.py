"""slimrank shared code: the numbered scripts are thin wrappers around these modules."""
