"""The kinds of search and scheduler `python -m pyseg.tune` offers (a module without heavy imports: the command
line names them before Ray or torch load)."""

SCHEDULERS = ("asha", "pbt", "none")  # ASHA early stopping, population based training, none
SEARCHES = ("optuna", "random")  # Optuna's TPE, Tune's random sampler
DEFAULT_SEARCH = "random"  # benchmarks/bench_search.py measures which search wins at the same compute
