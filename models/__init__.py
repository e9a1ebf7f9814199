"""The model families this code runs (families.py): what differs between them, and loading a checkpoint of any
of them. Nothing here imports a file of the method."""
