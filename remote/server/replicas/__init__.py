"""Every GPU of the instance behind the one URL, on Ray Serve (`python -m remote.server --gpus N`).

    laptop --ssh tunnel--> ingress (orch's uvicorn on 127.0.0.1:PORT, this process)
                             |-- Ray Serve handle (routes by queue length) --> replica 0 (GPU 0)
                             |                                              --> replica 1 (GPU 1) ...
                             '-- loopback HTTP, to a chosen replica: progress, interrupt, options, /metrics

Each replica (replica.py) is today's whole server (engine, compiled graphs, dynamic batching,
the page's queue) in a Ray actor that Ray Serve gives one GPU, restarts when it dies and
health-checks. It serves its app on its own 127.0.0.1 port and registers that port under
HOME/replicas/. The ingress (ingress.py) sends generation and every other request through the
Serve handle, so Ray's router picks the replica with the shorter queue; requests that concern
the job a replica holds (progress, interrupt, skip), settings every replica must share
(options, refreshes, checkpoint load/unload), and the page's own queue and sign-in (one replica
keeps them) go to the replicas directly. cluster.py starts Ray and Serve on the instance only
(no dashboard, no Serve HTTP proxy, no usage stats).

With one GPU, or none, none of this runs: __main__ serves the app itself, exactly as before.
"""
