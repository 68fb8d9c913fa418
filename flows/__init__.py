"""parclean: flows stage."""

from parclean.console import name_prefect_run_lines

name_prefect_run_lines()  # every process that imports a flow: the CLI, a served run, a worker's run
