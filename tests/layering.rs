//! The layers of `src/` stay layers: no two modules import each other, the top-level modules
//! form no cycle, and the rules the design names hold (nothing below `server` imports it; the
//! client does not import storage). Read from the `use crate::…` paths of the source files,
//! so a new import that breaks a rule fails here with the two files named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`storage::commitlog`) → its source text, for every file under `src/`
/// except the generated FlatBuffers code and the crate roots.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "generated" {
                    walk(&path, root, out);
                }
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] || parts.is_empty() {
                continue;
            }
            out.insert(parts.join("::"), std::fs::read_to_string(&path).unwrap());
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The longest module named by a prefix of `path`.
fn resolve<'a>(path: &str, names: &'a BTreeSet<String>) -> Option<&'a String> {
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len())
        .rev()
        .find_map(|i| names.get(&segs[..i].join("::")))
}

/// Module → the modules it imports (`crate::a::b`, `crate::a::{b, c}`, `super::x`).
fn imports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    let mut edges = BTreeMap::new();
    for (m, src) in mods {
        let mut targets = Vec::new();
        for (i, _) in src.match_indices("crate::") {
            let rest = &src[i + "crate::".len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let base = rest[..end].trim_end_matches(':').to_string();
            if rest[end..].starts_with('{') {
                let inner = &rest[end + 1..rest[end..].find('}').map_or(end + 1, |j| end + j)];
                for item in inner.split(',') {
                    let item = item.trim().split(' ').next().unwrap_or("");
                    if !item.is_empty() {
                        targets.push(format!("{base}::{item}"));
                    }
                }
            }
            targets.push(base);
        }
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p);
        for (i, _) in src.match_indices("super::") {
            let rest = &src[i + "super::".len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if parent.is_empty() {
                targets.push(rest[..end].to_string());
            } else {
                targets.push(format!("{parent}::{}", &rest[..end]));
            }
        }
        let set: BTreeSet<String> = targets
            .iter()
            .filter_map(|t| resolve(t, &names))
            .filter(|t| *t != m && !m.starts_with(&format!("{t}::")))
            .filter(|t| !t.starts_with(&format!("{m}::")))
            .cloned()
            .collect();
        edges.insert(m.clone(), set);
    }
    edges
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap()
}

#[test]
fn no_two_modules_import_each_other() {
    let edges = imports(&modules());
    let mut mutual = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if a < b && edges.get(b).is_some_and(|t| t.contains(a)) {
                mutual.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        mutual.is_empty(),
        "modules importing each other: {mutual:#?}"
    );
}

#[test]
fn the_top_level_modules_form_layers_without_a_cycle() {
    let edges = imports(&modules());
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, targets) in &edges {
        for b in targets {
            if top(a) != top(b) {
                graph.entry(top(a)).or_default().insert(top(b));
            }
        }
    }
    // Peel off modules that import nothing left; whatever cannot be peeled is in a cycle.
    let mut left: BTreeSet<&str> = graph
        .keys()
        .copied()
        .chain(graph.values().flatten().copied())
        .collect();
    loop {
        let leaves: Vec<&str> = left
            .iter()
            .copied()
            .filter(|m| {
                graph
                    .get(m)
                    .is_none_or(|t| t.iter().all(|d| !left.contains(d)))
            })
            .collect();
        if leaves.is_empty() {
            break;
        }
        for l in leaves {
            left.remove(l);
        }
    }
    let cycle: BTreeMap<&str, Vec<&str>> = left
        .iter()
        .map(|m| {
            let deps = graph[m]
                .iter()
                .copied()
                .filter(|d| left.contains(d))
                .collect();
            (*m, deps)
        })
        .collect();
    assert!(cycle.is_empty(), "top-level modules in a cycle: {cycle:#?}");
}

#[test]
fn lower_layers_do_not_import_the_server_and_the_client_does_not_import_storage() {
    let edges = imports(&modules());
    let mut broken = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            let below_server = ["replication", "storage", "shard", "broker"].contains(&top(a));
            if (below_server && top(b) == "server") || (top(a) == "client" && top(b) == "storage") {
                broken.push(format!("{a} imports {b}"));
            }
        }
    }
    assert!(broken.is_empty(), "layer rules broken: {broken:#?}");
}

/// `metrics` is pure and at the bottom (storage keeps its histograms in it), like `format`: it
/// imports nothing else of the crate, so any layer may count into it.
#[test]
fn the_metrics_module_imports_nothing_else_of_the_crate() {
    let edges = imports(&modules());
    let broken: Vec<String> = edges
        .iter()
        .filter(|(a, _)| top(a) == "metrics")
        .flat_map(|(a, targets)| {
            targets
                .iter()
                .filter(|b| top(b) != "metrics")
                .map(move |b| format!("{a} imports {b}"))
        })
        .collect();
    assert!(
        edges.keys().any(|m| m == "metrics::registry"),
        "the metrics module is where this test expects it"
    );
    assert!(broken.is_empty(), "metrics must stay a leaf: {broken:#?}");
}

/// The cluster layer (etcd, membership, election) is opt-in and sits beside the server: the
/// layers a single broker is built from never import it, so a broker without etcd runs none
/// of it.
#[test]
fn only_server_level_code_imports_the_cluster_layer() {
    let edges = imports(&modules());
    let below = [
        "storage",
        "shard",
        "broker",
        "replication",
        "protocol",
        "format",
        "metrics",
        "config",
    ];
    let broken: Vec<String> = edges
        .iter()
        .filter(|(a, _)| below.contains(&top(a)))
        .flat_map(|(a, targets)| {
            targets
                .iter()
                .filter(|b| top(b) == "cluster")
                .map(move |b| format!("{a} imports {b}"))
        })
        .collect();
    assert!(
        broken.is_empty(),
        "cluster imported from below: {broken:#?}"
    );
}
