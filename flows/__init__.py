"""parclean: flows stage."""

from parclean.console import name_prefect_run_lines

name_prefect_run_lines()  # every process that imports a flow: the CLI, a served run, a worker's run

# Each flow's return value is written to Prefect's result storage (as JSON: summaries and paths only). Under load
# the client can resend a final-state request whose response it lost; the server rejects the duplicate and answers
# with its stored copy of the state, which holds the result only if the result was persisted.
PERSISTED_RESULT = {"persist_result": True, "result_serializer": "json"}
