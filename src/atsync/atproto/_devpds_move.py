"""Moving a dev account to another dev PDS host, the way an account migrates on the network.

    old host                          new host                     PLC directory
    getServiceAuth (createAccount) -> createAccount (same DID,
                                      deactivated)
    getRepo ------------------------> importRepo
                                      getRecommendedDidCredentials
    the DID's rotation key signs the new credentials ----------->  the DID now names the
                                                                   new host and its key
                                      activateAccount (#identity,
                                      #account on its stream)
    deactivateAccount (#account)

The operation is signed with the old host's PLC rotation key, which a dev PDS keeps in its
state: no e-mailed confirmation token is needed. Records move; blobs and preferences do not.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import httpx
import libipld

from atsync._errors import DevPDSError

from ._crypto import load_keypair

if TYPE_CHECKING:
    from ._devpds import DevPDS

__all__ = ["move_account"]


def move_account(
    old: DevPDS, new: DevPDS, handle: str, password: str, rotation_key_hex: str
) -> str:
    """Move ``handle`` from ``old`` to ``new`` (both running, sharing one PLC directory);
    returns its DID, unchanged."""
    if old.plc_url != new.plc_url:
        raise DevPDSError("an account moves only between hosts that share a PLC directory")
    xrpc_old, xrpc_new = f"{old.pds_url}/xrpc/com.atproto", f"{new.pds_url}/xrpc/com.atproto"
    with httpx.Client(timeout=30.0) as http:

        def call(request: httpx.Request) -> httpx.Response:
            response = http.send(request)
            if response.status_code != 200:
                raise DevPDSError(
                    f"moving {handle}: {request.url.path} answered {response.status_code} "
                    f"{response.text[:300]}"
                )
            return response

        def bearer(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        login = {"identifier": handle, "password": password}
        session = call(http.build_request("POST", f"{xrpc_old}.server.createSession", json=login))
        did, old_token = str(session.json()["did"]), str(session.json()["accessJwt"])
        described = call(http.build_request("GET", f"{xrpc_new}.server.describeServer"))
        grant = call(http.build_request(
            "GET", f"{xrpc_old}.server.getServiceAuth", headers=bearer(old_token),
            params={"aud": described.json()["did"], "lxm": "com.atproto.server.createAccount"},
        )).json()["token"]  # fmt: skip
        account = {"did": did, "handle": handle, "password": password,
                   "email": f"{handle}@example.invalid"}  # fmt: skip
        created = call(http.build_request(
            "POST", f"{xrpc_new}.server.createAccount", json=account, headers=bearer(grant)
        ))  # fmt: skip
        new_token = str(created.json()["accessJwt"])
        car = call(http.build_request("GET", f"{xrpc_old}.sync.getRepo", params={"did": did}))
        call(http.build_request(
            "POST", f"{xrpc_new}.repo.importRepo", content=car.content,
            headers={**bearer(new_token), "Content-Type": "application/vnd.ipld.car"},
        ))  # fmt: skip
        credentials = call(http.build_request(
            "GET", f"{xrpc_new}.identity.getRecommendedDidCredentials", headers=bearer(new_token)
        )).json()  # fmt: skip
        last = call(http.build_request("GET", f"{old.plc_url}/{did}/log/audit")).json()[-1]
        operation = {
            "type": "plc_operation",
            "rotationKeys": credentials["rotationKeys"],
            "verificationMethods": credentials["verificationMethods"],
            "alsoKnownAs": credentials["alsoKnownAs"],
            "services": credentials["services"],
            "prev": last["cid"],
        }
        key = load_keypair("k256", bytes.fromhex(rotation_key_hex))
        signature = key.sign(libipld.encode_dag_cbor(operation))
        operation["sig"] = base64.urlsafe_b64encode(signature).decode().rstrip("=")
        call(http.build_request("POST", f"{old.plc_url}/{did}", json=operation))
        call(http.build_request(
            "POST", f"{xrpc_new}.server.activateAccount", headers=bearer(new_token)
        ))  # fmt: skip
        call(http.build_request(
            "POST", f"{xrpc_old}.server.deactivateAccount", json={}, headers=bearer(old_token)
        ))  # fmt: skip
    return did
