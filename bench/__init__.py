"""Benchmarks and the fault soak (issue 5).

``python -m bench`` measures the webhook path and the console against the
physical limit of this machine (pgbench replaying the processor's own SQL);
``python -m bench.soak`` pushes events through gunicorn and two workers while
workers are killed and the database restarts, and checks nothing was lost or
applied twice. Both run on a dedicated embedded PostgreSQL under ``var/bench``,
never on the demo or test databases; ``--quick`` runs everything small.
"""
