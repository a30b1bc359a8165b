"""The version of the HDF5 split layout that prepare_data.py writes (rvit/h5_writer.py) and
rvit/data.py reads; bump it when the layout changes. Kept free of torch so the converter
does not load it."""
SCHEMA_VERSION = 1
