# The quick start: `make run` and `make test` set up everything they need (scripts/with-env.sh).
.PHONY: run test test-fast bench lint

run:
	scripts/with-env.sh python -m pyseg.tune --space tune/quick.yaml --samples 4 --epochs 50 --imgsz 160 \
		--grace-period 15 --time-budget 450 --name quickstart-$$(date +%Y%m%d-%H%M%S)

test:
	scripts/with-env.sh scripts/run-tests.sh -q --durations=30

# the tier a developer runs all day: every module, without the tests marked slow (whole searches, clusters)
test-fast:
	scripts/with-env.sh scripts/run-tests.sh -q -m "not slow" --durations=15

bench:
	scripts/with-env.sh python benchmarks/bench_ops.py
	scripts/with-env.sh python benchmarks/bench_data.py

lint:
	scripts/with-env.sh ruff check pyseg tests benchmarks setup.py
