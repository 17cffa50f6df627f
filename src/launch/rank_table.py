"""hccl_tools rank tables: read and checked in one line per problem, and this server found in them."""
import ipaddress
import json
import socket
import subprocess
from typing import Iterable, List, Optional, Set, Tuple, Union

from src.launch.arguments import LaunchError


# ---------------------------------------------------------------- rank table

class Server:
    """One entry of a rank table's server_list: its server_id and [(device_id, rank_id)]."""

    def __init__(self, index: int, server_id: str, devices: List[Tuple[int, int]]) -> None:
        self.index = index
        self.server_id = server_id
        self.devices = devices

    @property
    def rank_ids(self) -> List[int]:
        return [rank for _, rank in self.devices]


MAX_TABLE_ID = 65535  # device ids are a server's chip numbers, rank ids count the whole cluster's


def _table_int(value, what, path):
    try:
        number = int(str(value).strip()) if len(str(value)) < 12 else -1
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_TABLE_ID:
        raise LaunchError(f"rank table {path}: {what} is not an integer in [0, {MAX_TABLE_ID}]: {str(value)[:40]!r}")
    return number


def read_rank_table(path: str) -> List[Server]:
    """An hccl_tools rank table -> [Server]; LaunchError (one line) for anything unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise LaunchError(f"rank table {path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise LaunchError(f"rank table {path} is not JSON: {err}") from None
    except RecursionError:
        raise LaunchError(f"rank table {path} is nested too deeply to be a rank table") from None
    server_list = table.get("server_list") if isinstance(table, dict) else None
    if not isinstance(server_list, list) or not server_list:
        raise LaunchError(f"rank table {path} has no server_list (make it with hccl_tools.py)")
    servers, owner = [], {}
    for index, entry in enumerate(server_list):
        devices = entry.get("device") if isinstance(entry, dict) else None
        if not isinstance(devices, list) or not devices:
            raise LaunchError(f"rank table {path}: server {index} has no devices")
        server_id = str(entry.get("server_id", ""))
        pairs = []
        for device in devices:
            if not isinstance(device, dict) or "device_id" not in device or "rank_id" not in device:
                raise LaunchError(f"rank table {path}: a device of server {index} lacks device_id or rank_id")
            device_id = _table_int(device["device_id"], f"device_id of server {index}", path)
            rank = _table_int(device["rank_id"], f"rank_id of server {index}", path)
            if rank in owner:
                raise LaunchError(f"rank table {path}: rank_id {rank} appears twice (servers {owner[rank]} "
                                  f"and {index})")
            owner[rank] = index
            pairs.append((device_id, rank))
        ids = [d for d, _ in pairs]
        if len(set(ids)) != len(ids):
            raise LaunchError(f"rank table {path}: server {index} lists a device_id twice: {ids}")
        servers.append(Server(index, server_id, pairs))
    total = len(owner)
    if sorted(owner) != list(range(total)):
        missing = sorted(set(range(total)) - set(owner))
        raise LaunchError(f"rank table {path}: rank ids must be 0..{total - 1}, missing {missing}")
    count = table.get("server_count")
    if count is not None and str(count).strip() != str(len(servers)):
        raise LaunchError(f"rank table {path}: server_count is {count} but server_list has {len(servers)} servers")
    return servers


def local_addresses() -> Set[str]:
    """IP addresses of this machine: `ip -j addr` when available, else the host name's."""
    found = set()
    try:
        out = subprocess.run(["ip", "-j", "addr"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, timeout=10, check=False).stdout
        for interface in json.loads(out or "[]"):
            for addr in interface.get("addr_info", []):
                if addr.get("local"):
                    found.add(addr["local"])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(info[4][0])
    except OSError:
        pass
    return found


def _same_address(a, b):
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def select_server(servers: List[Server], server_id: Optional[Union[int, str]] = None,
                  addresses: Optional[Iterable[str]] = None) -> Tuple[Server, str]:
    """-> (Server, how it was found). server_id: a position in server_list or a server_id of the
    table; without it the only server, else the server whose server_id is an address of this
    machine (addresses: default local_addresses())."""
    names = ", ".join(s.server_id or "?" for s in servers)
    if server_id not in (None, ""):
        text = str(server_id).strip()
        if text.isdigit() and int(text) < len(servers):
            return servers[int(text)], f"SERVER_ID={text}"
        for server in servers:
            if server.server_id and server.server_id == text:
                return server, f"SERVER_ID={text}"
        raise LaunchError(f"SERVER_ID={text} is neither a position 0..{len(servers) - 1} in the rank table "
                          f"nor one of its server_ids ({names})")
    if len(servers) == 1:
        return servers[0], "the table's only server"
    addresses = local_addresses() if addresses is None else set(addresses)
    matches = [s for s in servers if any(_same_address(s.server_id, a) for a in addresses)]
    if len(matches) == 1:
        return matches[0], f"its address {matches[0].server_id}"
    if not matches:
        raise LaunchError(f"this machine ({', '.join(sorted(addresses)) or 'no address found'}) is none of the "
                          f"{len(servers)} servers of the rank table ({names}): give SERVER_ID")
    raise LaunchError(f"this machine matches {len(matches)} servers of the rank table "
                      f"({', '.join(s.server_id for s in matches)}): give SERVER_ID")
