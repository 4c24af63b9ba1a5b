"""Everything that talks to Ray or MLflow: Ray Train (ray_train.py), the Tune driver (search*.py), MLflow
(tracking.py), storage URIs (storage.py), Ray Jobs (jobs.py). Importing the package imports none of them."""
