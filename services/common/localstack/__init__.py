"""The local stack: a private NATS (JetStream) and SeaweedFS S3 server on loopback, plus children.

``up(home)`` starts both servers on free ports (or the ones asked for) with freshly generated
credentials, waits until they really serve (NATS: connect and JetStream account info; S3: a
signed bucket request, then the bucket with its write-once check), then starts the child
processes a spec needs (loaders, workers) with the stack's environment and one log file each.
Everything lives under ``home`` (``QSENS_HOME``, default ``.qsens``)::

    stack.json          pids, ports, log paths, the non-secret environment (no secrets)
    credentials.env     QSENS_NATS_PASSWORD, QSENS_S3_ACCESS_KEY/SECRET_KEY (mode 0600)
    loader-token        the loaders' bearer token (QSENS_LOADER_TOKEN_FILE names it; 0600)
    nats/nats.conf      listen address, JetStream store, the generated user (0600)
    nats/jetstream/     JetStream data (kept across down/up)
    s3/identities.json  the generated S3 identity passed via -s3.config (0600)
    s3/security.toml    JWT signing keys of SeaweedFS's volume server and filer (0600)
    s3/data/            SeaweedFS data (kept across down/up)
    logs/<name>.log     one log per process

``down(home)`` stops children (SIGTERM), then the servers (NATS SIGTERM, SeaweedFS SIGINT),
each escalating to SIGKILL after a grace period, and removes the files holding secrets.
SeaweedFS's ``weed server`` can take 15 s or more to exit on SIGINT (its filer keeps retrying
to flush a metadata log to the volume server it has already stopped); objects are durable
once their PUT returned, so the SIGKILL after the grace period loses nothing.

Only the S3 port takes requests for stored objects: SeaweedFS's filer and master HTTP APIs
are off (S3 reaches them over gRPC) and its volume server takes writes only with a JWT.
A supervisor process restarts whatever dies (``supervisor``).

Modules: ``process`` (start, watch and stop one process), ``nats`` and ``s3`` (the two server
launchers), ``state`` (stack.json, ``up``, ``down``, ``status``), ``supervisor`` (restarts).
"""

from services.common.localstack.nats import NATS_BINARY, NatsServer, start_nats
from services.common.localstack.process import (
    ChildSpec,
    ProcessInfo,
    check_port_free,
    find_binary,
    free_ports,
    process_alive,
    start_child,
    stop_process,
    write_ready_file,
)
from services.common.localstack.s3 import (
    WEED_BINARY,
    S3Server,
    remove_weed_sockets,
    start_seaweedfs,
)
from services.common.localstack.state import Stack, down, load_stack, status, up

__all__ = [
    "NATS_BINARY",
    "WEED_BINARY",
    "ChildSpec",
    "NatsServer",
    "ProcessInfo",
    "S3Server",
    "Stack",
    "check_port_free",
    "down",
    "find_binary",
    "free_ports",
    "load_stack",
    "process_alive",
    "remove_weed_sockets",
    "start_child",
    "start_nats",
    "start_seaweedfs",
    "status",
    "stop_process",
    "up",
    "write_ready_file",
]
