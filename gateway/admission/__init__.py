"""Admission control and tenant fairness (off unless the config has an `admission` section).

    tenants.py     who a request belongs to (API key or x-kvgate-tenant), which models it may use
    rate_limit.py  per-tenant requests and tokens per minute
    saturation.py  a pool's free request slots, from the gateway's own accounting and scrapes
    fair_queue.py  priority bands with aging, weighted fair queuing (virtual token counter) per tenant
    controller.py  admit -> dispatch -> release; deadlines, disconnects, the SIGTERM drain
    metrics.py     kvgate_admission_*
    refusals.py    the OpenAI-shaped 403 / 429 / 503 answers
"""
