"""`python -m mlxdistill`: the same command line as the `mlxdistill` script, for when the
script is not on PATH (a venv not activated, `pip install --user`)."""

from .cli import main

main(prog_name="mlxdistill")
