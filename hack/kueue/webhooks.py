#!/usr/bin/env python3
"""Kueue's webhook configurations and CRD conversion patches, pointed at a manager on this host.

    webhooks.py KUEUE_SRC CA_CRT URL OUT_DIR     (URL: https://127.0.0.1:9443)

A local control plane cannot reach a Service, so each webhook gets `url:` instead of `service:`, with our CA. Only
the webhooks of batch/v1 Jobs (the one integration configured) and of Kueue's own objects are kept: the others would
call Kueue for every Pod, Deployment or StatefulSet created. The CRDs that upstream's kustomization patches for a
conversion webhook get the same treatment (OUT_DIR/conversion/<plural>.yaml).
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import yaml

KEEP_GROUPS = {"batch", "kueue.x-k8s.io"}
NOT_SYSTEM = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                    "values": ["kube-system", "kueue-system"]}]}  # fmt: skip


def main(src: Path, ca_file: Path, url: str, out: Path) -> None:
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    configs = [d for d in yaml.safe_load_all((src / "config/components/webhook/manifests.yaml").read_text()) if d]
    for config in configs:
        config["metadata"]["name"] = "kueue-" + config["metadata"]["name"]
        kept = []
        for hook in config["webhooks"]:
            groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
            if not groups & KEEP_GROUPS:
                continue
            hook["clientConfig"] = {"url": url + hook["clientConfig"]["service"]["path"], "caBundle": ca}
            if "batch" in groups:
                hook["namespaceSelector"] = NOT_SYSTEM
            kept.append(hook)
        config["webhooks"] = kept
    (out / "webhooks.yaml").write_text(yaml.safe_dump_all(configs, sort_keys=False))
    # The CRDs upstream serves through the conversion webhook: its kustomization's active webhook_in_<plural> patches.
    kustomization = (src / "config/components/crd/kustomization.yaml").read_text()
    conversion = {"spec": {"conversion": {"strategy": "Webhook", "webhook": {
        "clientConfig": {"url": url + "/convert", "caBundle": ca}, "conversionReviewVersions": ["v1"]}}}}  # fmt: skip
    (out / "conversion").mkdir(exist_ok=True)
    for plural in re.findall(r"^- path: patches/webhook_in_(\w+)\.yaml", kustomization, re.MULTILINE):
        (out / "conversion" / f"{plural}.yaml").write_text(yaml.safe_dump(conversion))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
