"""Jobs: generations submitted now and collected later (issue 23).

store.py is the durable queue and the stored results, shared by every replica through the
billing database. The API (submit, status, images, cancel, list), the runner that feeds a
replica's engine from the queue, and webhooks build on it.
"""
