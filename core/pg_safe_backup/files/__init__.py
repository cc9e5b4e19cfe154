"""What PostgreSQL puts on disk, read without a server and without Airflow."""
