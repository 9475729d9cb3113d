"""Queue mode, the Celery front end:

- ``app``: the worker's Celery application (``celery -A worker.queue.app``);
- ``tasks``: the thin tasks and the worker's signals;
- ``service``: one request start to finish, with the delivery rules (no Celery in it);
- ``sweep``: the producers' record of requests and the sweep that re-sends lost ones;
- ``foreign``: the consumer that dead-letters messages modq does not run;
- ``client``: the producer API, which imports none of the others but ``sweep``.

Importing this package imports none of its modules.
"""
