"""One module per pipeline stage: plain functions, files and small dataclasses in and out."""
