"""Resource models (pydantic v2): the single source of the CRD schemas."""
