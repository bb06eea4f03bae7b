"""`ray start --address=127.0.0.1:<port> ...`: a second node joining a test cluster bound to 127.0.0.1 only.

Ray 2.60 on Linux cannot start such a node as is.  Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
`ray start` rewrites 127.0.0.1 (in --address and --node-ip-address) to the machine's outward
address, where the head does not listen, and a node whose IP is not 127.0.0.1 listens on every
interface; with it, `ray start --address` refuses to join ("Multi-node Ray clusters are not
supported on Windows and OSX").  This runs Ray's own `ray` command with that refusal lifted and
127.0.0.1 kept as given; the node it starts is a stock one.  A real cluster's worker node runs
plain `ray start --address=<head IP>:6379` (cluster.yaml).

    python tests/ray_join.py start --address=127.0.0.1:<gcs port> --node-ip-address=127.0.0.1 ...
"""

import sys

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True  # the refusal in `ray start` (the environment keeps the variable at 0)
services.resolve_ip_for_localhost = lambda host: host  # 127.0.0.1 stays 127.0.0.1

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
