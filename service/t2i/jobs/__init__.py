"""Jobs: generations submitted now and collected later, run by whichever replica has room.

- store.py: the durable queue and the stored results, in the billing database (every replica
  shares it): submit, claim under a lease, renew, succeed, fail, cancel, list, expire.
- service.py: what the servicer's job calls do (SubmitJob, GetJob, CancelJob, ListJobs,
  GetJobImage), and the price reserved at submission (`submitted_charge`).
- runner.py: each replica's loop that feeds its engine from the queue, charges a job in the
  transaction that stores its images, and delivers the jobs' webhooks.
- webhooks.py: where webhooks may go (SSRF rules), how they are signed, when they are retried.
"""
