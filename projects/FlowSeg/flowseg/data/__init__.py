# Dataset registration and mappers; imported by flowseg/__init__.py so datasets register on import.
