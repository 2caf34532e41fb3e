-- The basic-auth app's user store lives beside the tracking store, in its own database.
CREATE DATABASE mlflow_auth OWNER mlflow;
