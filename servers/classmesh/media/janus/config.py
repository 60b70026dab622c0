"""Janus configuration for ClassMesh: render the templates in `conf/` into a config folder.

    janus -F <folder> -C <folder>/janus.jcfg

Only the videoroom plugin and the HTTP transport are enabled (every other plugin, transport,
event handler and logger shipped with Janus is disabled, so Janus starts in well under a
second); the HTTP API listens on `http_ip:http_port`, the admin API (stats) on
`http_ip:admin_port`; ICE gathers host candidates on `ice_enforce_list` only. The same
function serves deployments (`deploy/`) and the tests' private network namespace.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JanusConfig", "render_config", "TEMPLATES"]

TEMPLATES = Path(__file__).resolve().parent / "conf"
#: Debian's layout of the janus package.
LIB_DIR = Path("/usr/lib/x86_64-linux-gnu/janus")
PLUGIN = "libjanus_videoroom.so"
TRANSPORT = "libjanus_http.so"


@dataclass(frozen=True)
class JanusConfig:
    """What a rendered configuration depends on."""

    http_ip: str
    admin_secret: str
    http_port: int = 8088
    admin_port: int = 7088
    #: Interfaces (names or prefixes, comma-separated) ICE gathers on; "" = all but loopback.
    ice_enforce_list: str = ""
    rtp_port_range: str = "20000-40000"
    debug_level: int = 4
    lib_dir: Path = LIB_DIR


def _shared_objects(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".so"))


def render_config(dest: Path, cfg: JanusConfig) -> Path:
    """Write janus.jcfg, the HTTP transport's and the videoroom's config into `dest`;
    returns the path of janus.jcfg."""
    dest.mkdir(parents=True, exist_ok=True)
    plugins = cfg.lib_dir / "plugins"
    transports = cfg.lib_dir / "transports"
    values = {
        "configs_folder": str(dest),
        "plugins_folder": str(plugins),
        "transports_folder": str(transports),
        "events_folder": str(cfg.lib_dir / "events"),
        "loggers_folder": str(cfg.lib_dir / "loggers"),
        "debug_level": str(cfg.debug_level),
        "admin_secret": cfg.admin_secret,
        "rtp_port_range": cfg.rtp_port_range,
        "ice_enforce_list": cfg.ice_enforce_list,
        "disabled_plugins": ",".join(n for n in _shared_objects(plugins) if n != PLUGIN),
        "disabled_transports": ",".join(n for n in _shared_objects(transports) if n != TRANSPORT),
        "http_ip": cfg.http_ip,
        "http_port": str(cfg.http_port),
        "admin_port": str(cfg.admin_port),
    }
    for template in sorted(TEMPLATES.glob("*.jcfg")):
        text = string.Template(template.read_text()).substitute(values)
        target = dest / template.name
        target.write_text(text)
        os.chmod(target, 0o600)  # holds the admin secret
    return dest / "janus.jcfg"
