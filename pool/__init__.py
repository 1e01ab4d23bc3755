"""pool: relay rows of a SQL signals table into Celery tasks, fast and without losing one."""

__version__ = "0.1.0"
