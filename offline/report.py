"""The forensic report: one self-contained HTML file (images embedded) plus ``report.json``.

Built from what the patch job leaves in the bundle's ``report/`` directory
(scan, repair, calibration, evaluation results and trigger images, and
``audit.json`` when a training-data audit was added with ``report --audit``) and
the bundle manifest, following the forensic workflow: triage, detection, trigger,
impact, repair, attribution. The verdict is the first thing a reader sees.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from guard.screens.activation import filter_kind
from offline.jobs import TOOL_VERSION, write_json_atomic
from offline.plots import anomaly_chart_png

# MITRE ATLAS techniques, with the IDs and names ATLAS publishes
ATLAS = {
    "AML.T0018.000": ("Poison AI Model", "the model's weights carry a backdoor: it obeys a trigger"),
    "AML.T0020": ("Poison Training Data", "the usual way such a backdoor is implanted: stamped, relabelled "
                                          "training samples"),
    "AML.T0043.004": ("Insert Backdoor Trigger", "how the backdoor is used: the adversary adds the trigger to "
                                                 "inputs at inference time"),
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def trigger_character(mask: np.ndarray) -> str:
    """Patch (compact, small) or blended/invisible (spread over the image), from the recovered mask."""
    m = mask.reshape(mask.shape[-2], mask.shape[-1]) if mask.ndim > 2 else mask
    total = float(m.sum())
    if total <= 0:
        return "unknown (empty mask)"
    rows, cols = np.nonzero(m >= 0.5 * m.max())
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    area = box / m.size
    inside = float(m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].sum()) / total
    if area <= 0.15 and inside >= 0.5:
        return (f"patch: a compact region ({rows.max() - rows.min() + 1}x{cols.max() - cols.min() + 1} px at "
                f"row {rows.min()}, column {cols.min()}) holds {inside:.0%} of the mask")
    return (f"blended or invisible: the mask spreads over the image ({area:.0%} of it spans the strongest "
            f"pixels, {inside:.0%} of the mask inside)")


def _model_triage(scan: dict[str, Any]) -> dict[str, Any]:
    model = scan.get("model", {})
    path = Path(model.get("path", ""))
    triage: dict[str, Any] = {"file": str(path), "sha256": model.get("sha256"),
                              "format": {".onnx": "ONNX", ".pt": "TorchScript", ".pth": "TorchScript"}.get(
                                  path.suffix.lower(), path.suffix or "unknown"),
                              "classes": model.get("num_classes"), "features_layer": model.get("features_layer"),
                              "torch_version": scan.get("environment", {}).get("torch")}
    if path.is_file():
        triage["size_bytes"] = path.stat().st_size
        from offline.errors import ModelLoadError
        from offline.triage import triage_model

        try:  # what was scanned for code before the job loaded the file, and what was found
            found = triage_model(path)
            triage["code_scan"] = {k: found[k] for k in ("scanner", "scanned", "findings")} | (
                {"note": found["note"]} if "note" in found else {})
        except ModelLoadError as exc:
            triage["code_scan"] = {"refused": str(exc)}
        if "refused" in triage["code_scan"]:
            return triage  # never load a file that carries code, not even to count its parameters
        try:
            if triage["format"] == "ONNX":
                import onnx

                graph = onnx.load(str(path))
                triage["parameters"] = int(sum(np.prod(t.dims) for t in graph.graph.initializer))
                triage["opset"] = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
            else:
                import torch

                net = torch.jit.load(str(path), map_location="cpu")
                triage["parameters"] = int(sum(p.numel() for p in net.parameters()))
        except Exception as exc:  # triage must not fail on an odd model file; it says so instead
            triage["parameters_error"] = f"{type(exc).__name__}: {exc}"
    else:
        triage["note"] = "model file not available where the scan ran; figures from scan.json"
    return triage


def _code_scan(c: dict[str, Any]) -> str:
    if "refused" in c:
        return c["refused"]
    if not c.get("scanner"):
        return c.get("note", "not scanned")
    found = "; ".join(f"{f['severity']} {f['global']} in {f['where']}" for f in c.get("findings", []))
    return f"{c['scanner']}: {len(c.get('scanned', []))} pickle(s) scanned, " + (found or "no code found")


def build_report(report_dir: str | Path, manifest: dict[str, Any], true_trigger_file: str | Path | None = None
                 ) -> dict[str, Any]:
    """Write ``report.json`` and ``report.html`` into ``report_dir``; return the report."""
    report_dir = Path(report_dir)
    scan = _read_json(report_dir / "scan.json")
    repair = _read_json(report_dir / "repair.json")
    evaluation = _read_json(report_dir / "evaluate.json")
    class_names = manifest.get("class_names") or scan.get("data", {}).get("class_names") or []
    flagged = scan.get("flagged_classes", [])
    per_class = scan.get("per_class", [])
    truth = _read_json(Path(true_trigger_file)) if true_trigger_file else {}
    audit = _read_json(report_dir / "audit.json")
    exposure = _read_json(report_dir / "exposure.json")

    triggers = []
    for rec in scan.get("recovered_triggers", []):
        mask = np.load(report_dir / rec["mask_file"])
        entry = {"class": rec["class"], "class_name": class_names[rec["class"]] if class_names else str(rec["class"]),
                 "mask_l1_norm": rec["mask_l1_norm"], "held_out_asr": rec["held_out_asr"],
                 "character": trigger_character(mask), "examples_image": rec.get("examples_image"),
                 "candidates": rec.get("candidates", [])}
        desc = truth.get("trigger") or {}
        if desc.get("kind") == "patch":
            from offline.attacks import load_trigger

            plane = mask.reshape(mask.shape[-2:])
            region = load_trigger(desc).region(*plane.shape)
            entry["true_trigger_overlap"] = round(float(plane[region].sum() / max(plane.sum(), 1e-12)), 4)
        triggers.append(entry)

    before, after = repair.get("before", {}), repair.get("after", {})
    backdoored = bool(flagged)
    asr_key = "true_asr" if before.get("true_asr") is not None else "reversed_asr"
    verdict = {
        "backdoored": backdoored,
        "flagged_classes": flagged,
        "headline": (f"BACKDOOR FOUND: class {', '.join(class_names[c] if class_names else str(c) for c in flagged)} "
                     f"(anomaly index {max(c['anomaly_index'] for c in per_class if c['class'] in flagged):.2f}, "
                     f"threshold {scan.get('threshold', 2.0):g})" if backdoored else
                     "NO BACKDOOR FOUND by Neural Cleanse"),
    }
    if backdoored and after:
        verdict["repair"] = (f"repaired by {repair.get('method')}: clean accuracy {_pct(before.get('accuracy'))} -> "
                             f"{_pct(after.get('accuracy'))}, {'true' if asr_key == 'true_asr' else 'reversed'}"
                             f"-trigger ASR {_pct(before.get(asr_key))} -> {_pct(after.get(asr_key))}")
    audit_summary = _audit_summary(audit) if audit else None
    if audit_summary and audit_summary["flagged_classes"]:
        labels = ", ".join(class_names[c] if class_names else str(c) for c in audit_summary["flagged_classes"])
        verdict["audit"] = (f"training-data audit (activation clustering): a suspect cluster of "
                            f"{audit_summary['flagged_samples']} samples in label(s) {labels}")
    verdict_spec = manifest.get("verdict") or {}
    strip, af = manifest.get("strip") or {}, manifest.get("activation_filter") or {}
    report = {
        "tool": f"trojan-forensics {TOOL_VERSION}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": verdict,
        "triage": {"model": _model_triage(scan), "data": scan.get("data", {})},
        # scans written before the log scale existed used the linear index
        "detection": {"method": scan.get("method"), "threshold": scan.get("threshold"), "runs": scan.get("runs"),
                      "anomaly_scale": scan.get("settings", {}).get("anomaly_scale", "linear"),
                      "per_class": [{k: c[k] for k in ("class", "mask_l1_norm", "anomaly_index",
                                                       "reversed_trigger_asr", "flagged")} for c in per_class],
                      "training_data_audit": audit_summary},
        "trigger": triggers,
        "impact": {"clean_accuracy": before.get("accuracy"), "attack_success_rate": before.get(asr_key),
                   "asr_measured_with": "true trigger" if asr_key == "true_asr" else "recovered trigger",
                   "affected": (f"inputs of every other class carrying the trigger are classified as "
                                f"{', '.join(class_names[c] if class_names else str(c) for c in flagged)}")
                   if backdoored else "none found",
                   "deployment": exposure or None},
        "repair": {"method": repair.get("method"), "before": before, "after": after,
                   "guard": {"detectors": verdict_spec.get("detectors", []), "rule": verdict_spec.get("rule"),
                             "frr": verdict_spec.get("frr"), "classes": verdict_spec.get("classes", []),
                             "guarantee": verdict_spec.get("guarantee", {}), "strip_n": strip.get("n"),
                             "activation_score": filter_kind(af["neurons"], af.get("weights")) if af else None,
                             "test_frr": evaluation.get("frr"),
                             "test_frr_by_detector": evaluation.get("frr_by_detector"),
                             "true_trigger": evaluation.get("true_trigger"),
                             "reversed_trigger": evaluation.get("reversed_trigger")}},
        "attribution": {"atlas": [{"id": k, "name": v[0], "why": v[1]} for k, v in ATLAS.items()] if backdoored
                        else [],
                        "trigger_character": [t["character"] for t in triggers],
                        "known_trigger": (truth.get("trigger") or {}).get("kind"),
                        "poisoning": _poisoning(audit, triggers)},
    }
    write_json_atomic(report_dir / "report.json", report)
    images = {"anomaly": _png_data_uri(anomaly_chart_png(per_class, scan.get("threshold", 2.0), class_names))
              if per_class else None}
    for t in triggers:
        for key, name in (("examples", t["examples_image"]), ("mask", f"triggers/class_{t['class']}_mask.png"),
                          ("pattern", f"triggers/class_{t['class']}_pattern.png")):
            if name and (report_dir / name).is_file():
                images[f"{key}_{t['class']}"] = _png_data_uri((report_dir / name).read_bytes())
    strip = (exposure.get("strip") or {}).get("file")
    if strip and (report_dir / strip).is_file():
        images["exposure"] = _png_data_uri((report_dir / strip).read_bytes())
    (report_dir / "report.html").write_text(_html(report, images))
    return report


# the literature table's row for each family the audit reads from the flagged rows
_LITERATURE_FAMILY = {"patch": "patch", "blended": "blended", "image-dependent": "blended",
                      "sinusoidal": "clean-label"}


def _poisoning(audit: dict[str, Any], triggers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The poisoning rate the trigger-informed audit (else the clean-anchored one) estimates, against the rates
    the literature reports as enough for the trigger's family (``offline.attacks.rates``). The family is the
    one the anchored audit read from its flagged rows where it has one, else the recovered trigger's
    character (patch or blended)."""
    method = next((m for m in ("trigger_informed", "anchored_spectral") if audit and m in audit), None)
    if method is None or not audit.get("samples"):
        return None
    found = audit[method]
    characters = [c["character"] for c in audit.get("anchored_spectral", {}).get("classes", []) if "character" in c]
    if characters:
        read = max(characters, key=lambda c: c["rows"])
        character, source = read["family"], "the audit's flagged rows"
    elif triggers:
        character = "patch" if triggers[0]["character"].startswith("patch") else "blended"
        source = "the recovered trigger"
    else:
        return None
    from offline.attacks.rates import LITERATURE

    family = _LITERATURE_FAMILY[character]
    entry = next(r for r in LITERATURE if r.family == family)
    rate = len(found["flagged_indices"]) / audit["samples"]
    reading = ("no poisoned rows found in the flagged label(s)" if rate == 0 else
               "below" if rate < entry.low else "above" if rate > entry.high else "within")
    if rate:
        reading += (f" the {100 * entry.low:g}-{100 * entry.high:g} % the literature reports as enough for a "
                    f"{family} trigger ({entry.sources.split(';')[0]})")
    return {"method": method, "character": character, "character_from": source, "family": family,
            "flagged_rows": len(found["flagged_indices"]), "samples": audit["samples"],
            "estimated_rate": round(rate, 5), "literature_range": [entry.low, entry.high], "reading": reading}


def _audit_summary(audit: dict[str, Any]) -> dict[str, Any]:
    """The clustering statistics of ``trojan-forensics audit`` that the report shows."""
    keys = ("label", "count", "silhouette", "suspect_size", "kept_label", "reclassified_as", "flagged", "ambiguous",
            "spectral_peak")
    return {"layer": audit.get("settings", {}).get("layer"), "samples": audit.get("samples"),
            "flagged_classes": audit.get("flagged_classes", []),
            "flagged_samples": len(audit.get("activation_clustering", {}).get("flagged_indices", [])),
            "spectral_removed": len(audit.get("spectral_signatures", {}).get("removed_indices", [])),
            "per_class": [{k: c.get(k) for k in keys} for c in audit.get("classes", [])],
            "evaluation": audit.get("evaluation")}


def _audit_flag(c: dict[str, Any]) -> str:
    if not c["flagged"]:
        return ""
    return "FLAGGED (both clusters leave the label)" if c.get("ambiguous") else "FLAGGED"


def _audit_html(a: dict[str, Any] | None) -> str:
    if not a:
        return ("<p>Training-data audit: not run (<code>trojan-forensics audit</code>, then "
                "<code>trojan-forensics report --audit audit.json</code>).</p>")
    e = html.escape
    rows = "".join(
        f"<tr class='{'flag' if c['flagged'] else ''}'><td>{c['label']}</td><td>{c['count']}</td>"
        f"<td>{c['silhouette']:.3f}</td><td>{c['suspect_size']}</td><td>{_pct(c['kept_label'])}</td>"
        f"<td>{'' if c['reclassified_as'] is None else c['reclassified_as']}</td><td>{c['spectral_peak']:.1f}</td>"
        f"<td>{_audit_flag(c)}</td></tr>" for c in a["per_class"])
    ev = a.get("evaluation") or {}
    scored = "".join(f"<li>{e(k.replace('_', ' '))} against the known poison: precision {_pct(q['precision'])}, "
                     f"recall {_pct(q['recall'])}</li>" for k, q in ev.items())
    return (f"<h3>Training-data audit</h3><p>Activation clustering at layer {e(str(a['layer']))} over "
            f"{a['samples']} training samples: flagged label(s) {a['flagged_classes'] or 'none'} "
            f"({a['flagged_samples']} suspect samples); spectral signatures would remove {a['spectral_removed']}."
            f"</p><ul>{scored}</ul><table><tr><th>label</th><th>samples</th><th>silhouette</th><th>suspects</th>"
            f"<th>kept in label</th><th>mostly sent to</th><th>spectral peak</th><th></th></tr>{rows}</table>")


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _exposure_html(x: dict[str, Any] | None, strip: str | None) -> str:
    """The impact in production, from the guard's evidence (and metrics): ``report --evidence``."""
    if not x:
        return ""
    e = html.escape
    m = x.get("metrics") or {}
    served = ""
    if m:
        inputs = m.get("inputs_by_verdict", {})
        requests = m.get("requests_by_action", {})
        served = (f"<li>served since the bundle was loaded ({e(str(m.get('source')))}): "
                  f"{int(sum(requests.values()))} requests ({e(_counts(requests))}), "
                  f"{int(sum(inputs.values()))} inputs ({e(_counts(inputs))}); flagged by detector: "
                  f"{e(_counts(m.get('flagged_by_detector', {})))}</li>")
    chain = x.get("chain", {})
    intact = ("the evidence chain is intact" + (" and authenticated (HMAC)" if chain.get("authenticated") else "")
              if not chain.get("altered") and not chain.get("problems") else
              f"the evidence chain is NOT intact: {chain.get('altered', 0)} altered record(s); "
              + "; ".join(chain.get("problems", [])))
    img = f"<figure><img alt='flagged inputs' src='{strip}'><figcaption>the last flagged inputs, with the class " \
          f"the model answered and the detectors behind the refusal</figcaption></figure>" if strip else ""
    return (f"<h3 id='exposure'>Deployment exposure</h3><ul>{served}"
            f"<li>flagged inputs kept as evidence: {x['flagged_inputs']} in {x['requests']} request(s), "
            f"{e(str(x.get('first_flagged')))} to {e(str(x.get('last_flagged')))}</li>"
            f"<li>by detector: {e(_counts(x.get('flagged_by_detector', {})))}</li>"
            f"<li>answered with class: {e(_counts(x.get('answered_with', {})))}</li>"
            f"<li>{e(intact)}</li></ul><div class='imgs'>{img}</div>")


def _poisoning_html(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    method = p.get("method", "trigger_informed").replace("_", "-").replace("anchored-spectral", "clean-anchored")
    character = (f" The poison's character: {html.escape(p['character'])} (read from "
                 f"{html.escape(p['character_from'])})." if p.get("character") else "")
    return (f"<p id='poisoning'>Poisoning ({method} audit): {p['flagged_rows']} of {p['samples']} "
            f"training rows, an estimated {100 * p['estimated_rate']:.2f} % of the set: "
            f"{html.escape(p['reading'])}.{character}</p>")


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "n/a"


def _html(r: dict[str, Any], images: dict[str, str | None]) -> str:
    e = html.escape
    v = r["verdict"]
    rows = "".join(
        f"<tr class='{'flag' if c['flagged'] else ''}'><td>{c['class']}</td><td>{c['mask_l1_norm']:.1f}</td>"
        f"<td>{c['anomaly_index']:.2f}</td><td>{_pct(c['reversed_trigger_asr'])}</td>"
        f"<td>{'FLAGGED' if c['flagged'] else ''}</td></tr>" for c in r["detection"]["per_class"])
    trig = ""
    for t in r["trigger"]:
        found = [(k, images.get(f"{k}_{t['class']}")) for k in ("mask", "pattern", "examples")]
        imgs = "".join(f"<figure><img alt='{k} of class {t['class']}' src='{uri}'><figcaption>{k}</figcaption></figure>"
                       for k, uri in found if uri)
        overlap = (f"<li>overlap with the true trigger: {t['true_trigger_overlap']:.0%} of the recovered mask lies on "
                   f"it</li>" if "true_trigger_overlap" in t else "")
        starts = (f" (the smallest of {len(t['candidates'])} starts, mask L1 "
                  f"{', '.join(format(c['mask_l1_norm'], '.1f') for c in t['candidates'])})"
                  if len(t.get("candidates", [])) > 1 else "")
        trig += (f"<h3>Class {e(t['class_name'])}</h3><ul><li>recovered trigger's attack success rate on held-out "
                 f"images: {_pct(t['held_out_asr'])}</li><li>mask L1 norm {t['mask_l1_norm']:.1f}{starts}</li>"
                 f"<li>character: {e(t['character'])}</li>{overlap}</ul><div class='imgs'>{imgs}</div>")
    rep, g = r["repair"], r["repair"]["guard"]
    before, after = rep["before"], rep["after"]
    repair_rows = "".join(f"<tr><td>{e(k.replace('_', ' '))}</td><td>{_pct(before.get(k))}</td>"
                          f"<td>{_pct(after.get(k))}</td></tr>" for k in before if k != "change_interval")
    if after.get("change_interval"):
        low, high = after["change_interval"]
        repair_rows += (f"<tr><td>accuracy change, 95 % interval (paired)</td><td></td>"
                        f"<td>{100 * low:+.1f} to {100 * high:+.1f} points</td></tr>")
    scope = f"; refusing only inputs answered as class(es) {e(str(g['classes']))}" if g.get("classes") else ""
    guarantee_ = g.get("guarantee") or {}
    parts = [f"STRIP (n={g['strip_n']})" if g.get("strip_n") else "", *[d for d in g.get("detectors", [])
                                                                     if d not in ("strip", "activation")],
             f"the activation filter ({e(g['activation_score'])})" if g.get("activation_score") else ""]
    tri = r["triage"]["model"]
    data = r["triage"]["data"]
    atlas = "".join(f"<li><b>{e(a['id'])}</b> {e(a['name'])}: {e(a['why'])}</li>" for a in r["attribution"]["atlas"])
    anomaly = f"<img alt='anomaly index per class' src='{images['anomaly']}'>" if images.get("anomaly") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trojan-forensics report: {e(v['headline'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem;color:#222}}
.verdict{{padding:1rem 1.25rem;border-radius:6px;color:#fff;background:{'#c0392b' if v['backdoored'] else '#27ae60'}}}
.verdict h1{{margin:0;font-size:1.5rem}} table{{border-collapse:collapse}} td,th{{padding:.2rem .6rem;
border-bottom:1px solid #ddd;text-align:right}} tr.flag{{background:#fdecea;font-weight:bold}}
.imgs{{display:flex;gap:1rem;flex-wrap:wrap}} figure{{margin:0}} img{{image-rendering:pixelated;max-width:100%}}
</style></head>
<body>
<section class="verdict" id="verdict"><h1>{e(v['headline'])}</h1>
<p>{e(v.get('repair', ''))}</p>{'<p>' + e(v['audit']) + '</p>' if 'audit' in v else ''}</section>
<h2>1. Triage</h2><ul>
<li>model: {e(str(tri.get('file')))} ({e(str(tri.get('format')))}),
SHA-256 <code>{e(str(tri.get('sha256')))}</code></li>
<li>size: {tri.get('size_bytes', 'n/a')} bytes; parameters: {tri.get('parameters', 'n/a')};
{'opset ' + str(tri['opset']) + '; ' if 'opset' in tri else ''}torch {e(str(tri.get('torch_version')))}</li>
<li>code scan: {e(_code_scan(tri.get('code_scan') or {}))}</li>
<li>classes: {tri.get('classes')}; features layer: {e(str(tri.get('features_layer')))}</li>
<li>clean data: {e(str(data.get('source')))} ({data.get('images')} images)</li></ul>
<h2>2. Detection</h2><p>{e(str(r['detection']['method']))}: a class is flagged when its anomaly index (MAD over the
{'logarithms of the ' if r['detection']['anomaly_scale'] == 'log' else ''}mask norms) exceeds
{r['detection']['threshold']} ({r['detection']['runs']} run(s)).</p>{anomaly}
<table><tr><th>class</th><th>mask L1</th><th>anomaly index</th><th>reversed ASR</th><th></th></tr>{rows}</table>
{_audit_html(r['detection']['training_data_audit'])}
<h2>3. Trigger</h2>{trig or '<p>No trigger recovered: no class was flagged.</p>'}
<h2>4. Impact</h2><ul><li>clean accuracy: {_pct(r['impact']['clean_accuracy'])}</li>
<li>attack success rate ({e(r['impact']['asr_measured_with'])}): {_pct(r['impact']['attack_success_rate'])}</li>
<li>affected: {e(r['impact']['affected'])}</li></ul>
{_exposure_html(r['impact'].get('deployment'), images.get('exposure'))}
<h2>5. Repair</h2><p>method: {e(str(rep['method']))}</p>
<table><tr><th></th><th>before</th><th>after</th></tr>{repair_rows}</table>
<p>Guard verdict: {e(', '.join(p for p in parts if p))} combined by {e(str(g.get('rule')))}'s rule at one
budget of {_pct(g.get('frr'))} clean refusals{scope}; {guarantee_.get('calibration_images')} calibration images
guarantee {_pct(guarantee_.get('expected_frr'))} (95 % bound {_pct(guarantee_.get('frr_upper_95'))}); measured on
held-out clean data {_pct(g.get('test_frr'))}.</p>
<h2>6. Attribution</h2><ul>{atlas or '<li>no backdoor: nothing to attribute</li>'}</ul>
<p>Trigger character: {e('; '.join(r['attribution']['trigger_character']) or 'n/a')}</p>
{_poisoning_html(r['attribution'].get('poisoning'))}
<footer><p>{e(r['tool'])}, {e(r['created'])}</p></footer>
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
