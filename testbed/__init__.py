"""The real processes and stores that tests and benchmarks run against: the service and
`t2i up` in subprocesses, throwaway PostgreSQL databases and Redis, a raw gRPC caller, a
metrics scraper and the scale-out proof. Shared by tests/ and benchmarks/ (neither imports
the other)."""
