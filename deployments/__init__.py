"""Deployment targets: the BentoML service and the Prefect deployments with cron schedules."""
