# Modules of this subpackage are imported here so that importing flowseg registers them.
