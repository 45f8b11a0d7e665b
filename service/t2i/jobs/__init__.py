"""Jobs: generations submitted now and collected later, run by whichever replica has room.

- store.py: the durable queue, in the billing database (every replica shares it): submit, claim
  under a lease, renew, succeed, fail, cancel, list, expire; and each job's events (what
  WatchJob and GET /jobs/{id}/events replay, and GetJob's progress).
- results.py: where the images of succeeded jobs are kept (one small interface; the database).
- service.py: what the servicer's job calls do (SubmitJob, GetJob, WatchJob, CancelJob,
  ListJobs, GetJobImage), and the price reserved at submission (`submitted_charge`).
- runner.py: each replica's loop that feeds its engine from the queue, charges a job in the
  transaction that stores its images, and delivers the jobs' webhooks.
- webhooks.py: where webhooks may go (SSRF rules), how they are signed, when they are retried.
"""
