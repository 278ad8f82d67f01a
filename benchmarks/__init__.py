"""`make bench`: benchmarks of the real local mesh.

They run their meshes without authentication (their clients call tiers' own ports and send no
keys); what authentication adds per call is one SHA-256 and, on a gateway, a lookup cached per key.
"""

import os

os.environ.setdefault("ASKMESH_AUTH_ENABLED", "false")
