# The quick start: `make run` and `make test` set up everything they need (scripts/with-env.sh).
.PHONY: run test test-fast bench lint

run:
	scripts/with-env.sh python -m pyseg.tune --space tune/quick.yaml --samples 4 --epochs 50 --imgsz 160 \
		--grace-period 15 --time-budget 450 --name quickstart-$$(date +%Y%m%d-%H%M%S)

# Both tiers run on 2 pytest processes (pytest-xdist), each test module in one of them (its module fixtures, a
# local Ray among them, shared as before), the longest modules first (tests/conftest.py: LONGEST_MODULES).
test:
	scripts/with-env.sh scripts/run-tests.sh -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30

# the tier a developer runs all day: every module, without the tests marked slow (whole searches, clusters)
test-fast:
	scripts/with-env.sh scripts/run-tests.sh -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" --durations=15

bench:
	scripts/with-env.sh python benchmarks/bench_ops.py
	scripts/with-env.sh python benchmarks/bench_data.py

lint:
	scripts/with-env.sh ruff check pyseg tests benchmarks setup.py
