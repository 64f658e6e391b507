//! Cluster commands of `metroctl`: status, sites, nodes, volumes, witness.
//! Each renders a table, or JSON with `-o json` (stable keys, DESIGN.md §8).

use crate::client::{request, Target, READ_DEADLINE, WRITE_DEADLINE};
use metro_api::error::Code;
use metro_api::pb::control as pb;
use serde_json::{json, Value};

/// Render rows as an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(header.to_vec()).trim_end().to_string();
    for r in rows {
        out.push('\n');
        out.push_str(line(r.iter().map(String::as_str).collect()).trim_end());
    }
    out
}

/// Parse sizes like `1GiB`, `512M`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (examples: 1GiB, 512MiB, 4096)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit `{u}` (use KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// A node's place in the quorum, as shown in tables.
fn quorum_role(voter: bool) -> String {
    if voter { "voter" } else { "learner" }.to_string()
}

pub fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    if let Some(m) = crate::client::explain_transport(&s) {
        return anyhow::anyhow!("{m}");
    }
    let msg = s.message();
    let next = match s.code() {
        tonic::Code::Unavailable if !msg.contains("next step") => {
            " (next step: check `metroctl status` and that the daemons run)"
        }
        tonic::Code::DeadlineExceeded if !msg.contains("next step") => {
            " (next step: the cluster is slow or has no quorum; check `metroctl status`)"
        }
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied if !msg.contains("next step") => {
            " (next step: use an admin certificate for changes)"
        }
        _ => "",
    };
    anyhow::anyhow!("{}{next}", if msg.is_empty() { s.code().description() } else { msg })
}

pub fn status_json(t: &Target, s: &pb::ClusterStatus) -> Value {
    json!({
        "cluster": s.cluster,
        "leader": if s.leader.is_empty() { Value::Null } else { json!(s.leader) },
        "term": s.term,
        "voters": s.voters,
        "learners": s.learners,
        "preferred_site": s.preferred_site,
        "sites": s.sites.iter().map(|x| json!({"name": x.name, "kind": x.kind, "state": x.state})).collect::<Vec<_>>(),
        "nodes": s.nodes.iter().map(|n| json!({"id": n.id, "site": n.site, "role": n.role, "voter": n.voter,
            "reachable": n.reachable, "api": n.api, "nbd": n.nbd, "capacity_bytes": n.capacity_bytes, "used_bytes": n.used_bytes,
            "rtt_us": opt_us(n.rtt_us)})).collect::<Vec<_>>(),
        "witness": s.witness.as_ref().map(|w| witness_json(w, s.voters.contains(&w.id))),
        "etcd": s.etcd.iter().map(|e| json!({"name": t.etcd_name(&e.endpoint), "healthy": e.healthy, "endpoint": e.endpoint})).collect::<Vec<_>>(),
        "alerts": s.alerts,
        "answered_by": s.answered_by,
        "stale": s.stale,
    })
}

/// An RTT in µs as JSON: null when unknown (0 on the wire).
fn opt_us(us: u64) -> Value {
    if us == 0 {
        Value::Null
    } else {
        json!(us)
    }
}

/// An RTT in µs for tables: `12.3 ms`, or `-` when unknown.
pub fn rtt_text(us: u64) -> String {
    if us == 0 {
        "-".into()
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// `rtt_us`/`rtt_last_us` are null when unknown (no fresh sample on the leader).
pub fn witness_json(w: &pb::WitnessStatus, voter: bool) -> Value {
    json!({
        "id": w.id, "reachable": w.reachable, "voter": voter,
        "rtt_us": opt_us(w.rtt_us), "rtt_last_us": opt_us(w.rtt_last_us),
        "rtt_measured_by": if w.rtt_measured_by.is_empty() { Value::Null } else { json!(w.rtt_measured_by) },
    })
}

fn witness_row(w: &pb::WitnessStatus, voter: bool) -> Vec<String> {
    vec![
        w.id.clone(),
        if w.reachable { "yes".into() } else { "NO".into() },
        quorum_role(voter),
        rtt_text(w.rtt_us),
        rtt_text(w.rtt_last_us),
        if w.rtt_measured_by.is_empty() { "-".into() } else { w.rtt_measured_by.clone() },
    ]
}

const WITNESS_HEADER: [&str; 6] = ["WITNESS", "REACHABLE", "QUORUM", "RTT", "RTT-LAST", "MEASURED-BY"];

pub fn volume_json(v: &pb::VolumeStatus) -> Value {
    json!({
        "name": v.name,
        "size": v.size_bytes,
        "primary": if v.primary.is_empty() { Value::Null } else { json!(v.primary) },
        "replicas": v.replicas,
        "in_sync": v.in_sync,
        "epoch": v.epoch,
        "state": v.state,
        "lease_policy": v.lease_policy,
        "nbd": if v.primary_nbd.is_empty() { Value::Null } else { json!(format!("nbd://{}/{}", v.primary_nbd, v.name)) },
        "stale": v.stale,
        "replica_status": v.replica_status.iter().map(|r| json!({
            "node": r.node, "in_sync": r.in_sync, "dirty_bytes": r.dirty_bytes,
            "resync_bytes_left": r.resync_bytes_left, "resync_rate_bps": r.resync_rate_bps, "full_resyncs": r.full_resyncs,
        })).collect::<Vec<_>>(),
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// A read that wants the quorum leader's view. A node that cannot confirm
/// its answer with the leader (it is cut off, or just restarted) marks it
/// stale; then the next endpoints are asked, and the stale answer is used only
/// when none of them has a confirmed one, with a warning on stderr.
async fn confirmed_read<T, F, Fut>(
    t: &Target,
    stale: impl Fn(&T) -> Option<String>,
    call: F,
) -> anyhow::Result<T>
where
    F: Fn(pb::control_client::ControlClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut fallback: Option<(T, String)> = None;
    let mut start = 0;
    loop {
        let (i, c) = match t.connect_from(start).await {
            Ok(x) => x,
            Err(e) => match fallback {
                Some(_) => break,
                None => return Err(e.into()),
            },
        };
        match call(c).await {
            Ok(r) => match stale(&r) {
                None => return Ok(r),
                Some(who) => {
                    if fallback.is_none() {
                        fallback = Some((r, who));
                    }
                }
            },
            // The first answer that is an error is the answer (as before).
            Err(e) if fallback.is_none() => return Err(status_err(e)),
            Err(_) => {}
        }
        start = i + 1;
        if start >= t.endpoints.len() {
            break;
        }
    }
    let (r, who) = fallback.expect("set before leaving the loop");
    eprintln!(
        "warning: no node could confirm this with the quorum leader; showing {who}'s own view, which may be out of date (check `metroctl status` alerts)"
    );
    Ok(r)
}

pub async fn get_status(t: &Target) -> anyhow::Result<pb::ClusterStatus> {
    confirmed_read(
        t,
        |s: &pb::ClusterStatus| s.stale.then(|| s.answered_by.clone()),
        |mut c| async move {
            c.get_status(request(pb::GetStatusRequest {}, READ_DEADLINE)).await.map(|r| r.into_inner())
        },
    )
    .await
}

async fn get_volume(t: &Target, name: &str) -> anyhow::Result<pb::VolumeStatus> {
    confirmed_read(
        t,
        |v: &pb::VolumeStatus| v.stale.then(|| v.answered_by.clone()),
        |mut c| async move {
            c.get_volume(request(pb::VolumeRef { name: name.to_string() }, READ_DEADLINE))
                .await
                .map(|r| r.into_inner())
        },
    )
    .await
}

async fn list_volumes(t: &Target) -> anyhow::Result<pb::ListVolumesResponse> {
    confirmed_read(
        t,
        |v: &pb::ListVolumesResponse| v.stale.then(|| v.answered_by.clone()),
        |mut c| async move {
            c.list_volumes(request(pb::ListVolumesRequest {}, READ_DEADLINE)).await.map(|r| r.into_inner())
        },
    )
    .await
}

pub async fn status(t: &Target, json_out: bool) -> anyhow::Result<()> {
    let s = get_status(t).await?;
    if json_out {
        print_json(&status_json(t, &s));
        return Ok(());
    }
    println!(
        "cluster {}   leader {}   term {}   preferred site {}",
        s.cluster,
        if s.leader.is_empty() { "NONE" } else { &s.leader },
        s.term,
        if s.preferred_site.is_empty() { "-" } else { &s.preferred_site }
    );
    println!();
    let rows: Vec<Vec<String>> =
        s.sites.iter().map(|x| vec![x.name.clone(), x.kind.clone(), x.state.clone()]).collect();
    println!("{}", table(&["SITE", "KIND", "STATE"], &rows));
    println!();
    let rows: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.site.clone(),
                n.role.clone(),
                quorum_role(n.voter),
                if n.reachable { "yes".into() } else { "NO".into() },
                rtt_text(n.rtt_us),
            ]
        })
        .collect();
    println!("{}", table(&["NODE", "SITE", "ROLE", "QUORUM", "REACHABLE", "RTT"], &rows));
    if let Some(w) = &s.witness {
        println!();
        println!("{}", table(&WITNESS_HEADER, &[witness_row(w, s.voters.contains(&w.id))]));
    }
    println!();
    let rows: Vec<Vec<String>> = s
        .etcd
        .iter()
        .map(|e| {
            vec![
                t.etcd_name(&e.endpoint),
                e.endpoint.clone(),
                if e.healthy { "healthy".into() } else { "UNHEALTHY".into() },
            ]
        })
        .collect();
    println!("{}", table(&["ETCD", "ENDPOINT", "HEALTH"], &rows));
    let vols = list_volumes(t).await?;
    if !vols.volumes.is_empty() {
        println!();
        print_volume_table(&vols.volumes);
    }
    if !s.alerts.is_empty() {
        println!();
        for a in &s.alerts {
            println!("ALERT: {a}");
        }
    }
    Ok(())
}

fn print_volume_table(vols: &[pb::VolumeStatus]) {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                human(v.size_bytes),
                if v.primary.is_empty() { "-".into() } else { v.primary.clone() },
                v.in_sync.join(","),
                v.replicas.join(","),
                v.epoch.to_string(),
                v.state.clone(),
            ]
        })
        .collect();
    println!("{}", table(&["VOLUME", "SIZE", "PRIMARY", "IN-SYNC", "REPLICAS", "EPOCH", "STATE"], &rows));
}

pub async fn witness_status(t: &Target, json_out: bool) -> anyhow::Result<()> {
    let s = get_status(t).await?;
    let w = s.witness.ok_or_else(|| {
        anyhow::anyhow!(
            "the cluster has no registered witness (next step: start metro-witness in the witness site)"
        )
    })?;
    let voter = s.voters.contains(&w.id);
    if json_out {
        print_json(&witness_json(&w, voter));
    } else {
        println!("{}", table(&WITNESS_HEADER, &[witness_row(&w, voter)]));
    }
    Ok(())
}

pub async fn node_list(t: &Target, json_out: bool) -> anyhow::Result<()> {
    let s = get_status(t).await?;
    if json_out {
        print_json(&status_json(t, &s)["nodes"]);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.site.clone(),
                n.role.clone(),
                quorum_role(n.voter),
                n.reachable.to_string(),
                rtt_text(n.rtt_us),
                n.api.clone(),
                if n.nbd.is_empty() { "-".into() } else { n.nbd.clone() },
                format!("{} / {}", human(n.used_bytes), human(n.capacity_bytes)),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["NODE", "SITE", "ROLE", "QUORUM", "REACHABLE", "RTT", "API", "NBD", "PROVISIONED/CAPACITY"],
            &rows
        )
    );
    Ok(())
}

fn config_json(r: &pb::ClusterConfigReply) -> Value {
    let mut entries = serde_json::Map::new();
    for e in &r.entries {
        entries.insert(e.key.clone(), json!(e.value));
    }
    json!({
        "config": entries,
        "generation": r.generation,
        "applied_generation": r.applied_generation,
        "source": r.source,
    })
}

fn print_config(r: &pb::ClusterConfigReply, json_out: bool) {
    if json_out {
        print_json(&config_json(r));
        return;
    }
    let rows: Vec<Vec<String>> = r.entries.iter().map(|e| vec![e.key.clone(), e.value.clone()]).collect();
    println!("{}", table(&["KEY", "VALUE"], &rows));
    println!(
        "\ngeneration {} (applied by the cluster: {}; source: {})",
        r.generation,
        if r.applied_generation == 0 { "none yet".to_string() } else { r.applied_generation.to_string() },
        r.source
    );
}

pub async fn config_show(t: &Target, json_out: bool) -> anyhow::Result<()> {
    let mut c = t.connect().await?;
    let r = c
        .get_cluster_config(request(pb::GetClusterConfigRequest {}, READ_DEADLINE))
        .await
        .map_err(status_err)?
        .into_inner();
    print_config(&r, json_out);
    Ok(())
}

pub async fn config_set(t: &Target, pairs: Vec<(String, String)>, json_out: bool) -> anyhow::Result<()> {
    let mut c = t.connect().await?;
    let set = pairs.into_iter().map(|(key, value)| pb::ConfigEntry { key, value }).collect();
    let r = c
        .set_cluster_config(request(pb::SetClusterConfigRequest { set }, WRITE_DEADLINE))
        .await
        .map_err(status_err)?
        .into_inner();
    print_config(&r, json_out);
    Ok(())
}

pub async fn node_drain(t: &Target, id: &str) -> anyhow::Result<()> {
    let mut c = t.connect().await?;
    c.node_drain(request(pb::NodeRef { id: id.to_string() }, WRITE_DEADLINE)).await.map_err(status_err)?;
    println!("node {id} drained: it is primary of no volume");
    Ok(())
}

pub async fn site_list(t: &Target, json_out: bool) -> anyhow::Result<()> {
    let s = get_status(t).await?;
    if json_out {
        print_json(&status_json(t, &s)["sites"]);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = s
        .sites
        .iter()
        .map(|x| {
            vec![x.name.clone(), x.kind.clone(), x.state.clone(), (x.name == s.preferred_site).to_string()]
        })
        .collect();
    println!("{}", table(&["SITE", "KIND", "STATE", "PREFERRED"], &rows));
    Ok(())
}

/// `site activate|deactivate`. Without a quorum, `activate` must reach a
/// voter of the site (the quorum-loss override runs there): a daemon that
/// answers MET-013 (wrong node) is skipped for the next endpoint.
pub async fn site_set(t: &Target, name: &str, activate: bool, force: bool) -> anyhow::Result<()> {
    let mut start = 0;
    loop {
        let (i, mut c) = t.connect_from(start).await?;
        let req = request(pb::SiteRequest { name: name.to_string(), force }, WRITE_DEADLINE);
        let r = if activate { c.site_activate(req).await } else { c.site_deactivate(req).await };
        match r {
            Ok(s) => {
                let s = s.into_inner();
                println!("site {} is {}", s.name, s.state);
                if !s.note.is_empty() {
                    println!("{}", s.note);
                }
                return Ok(());
            }
            Err(e)
                if activate
                    && e.message().contains(Code::WrongNode.as_str())
                    && i + 1 < t.endpoints.len() =>
            {
                eprintln!("{}: {}; trying the next endpoint", t.endpoints[i], e.message());
                start = i + 1;
            }
            Err(e) => return Err(status_err(e)),
        }
    }
}

pub struct CreateArgs {
    pub name: String,
    pub size: u64,
    pub iops: u64,
    pub bandwidth: u64,
    pub policy: String,
    pub site: Option<String>,
}

pub async fn volume_create(t: &Target, a: CreateArgs, json_out: bool) -> anyhow::Result<()> {
    let mut c = t.connect().await?;
    let v = c
        .create_volume(request(
            pb::CreateVolumeRequest {
                name: a.name,
                size_bytes: a.size,
                iops_limit: a.iops,
                bandwidth_limit: a.bandwidth,
                lease_policy: a.policy,
                primary_site: a.site.unwrap_or_default(),
            },
            WRITE_DEADLINE,
        ))
        .await
        .map_err(status_err)?
        .into_inner();
    print_volume(&v, json_out);
    Ok(())
}

fn print_volume(v: &pb::VolumeStatus, json_out: bool) {
    if json_out {
        print_json(&volume_json(v));
        return;
    }
    print_volume_table(std::slice::from_ref(v));
    if !v.primary_nbd.is_empty() {
        println!("\nexport: nbd://{}/{}", v.primary_nbd, v.name);
    }
    if !v.replica_status.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = v
            .replica_status
            .iter()
            .map(|r| {
                vec![
                    r.node.clone(),
                    r.in_sync.to_string(),
                    human(r.dirty_bytes),
                    human(r.resync_bytes_left),
                    format!("{}/s", human(r.resync_rate_bps)),
                    r.full_resyncs.to_string(),
                ]
            })
            .collect();
        println!("{}", table(&["REPLICA", "IN-SYNC", "DIRTY", "RESYNC-LEFT", "RATE", "FULL-RESYNCS"], &rows));
    }
}

pub async fn volume_show(t: &Target, name: &str, json_out: bool) -> anyhow::Result<()> {
    let v = get_volume(t, name).await?;
    print_volume(&v, json_out);
    Ok(())
}

pub async fn volume_list(t: &Target, json_out: bool) -> anyhow::Result<()> {
    let vols = list_volumes(t).await?;
    if json_out {
        print_json(&Value::Array(vols.volumes.iter().map(volume_json).collect()));
    } else {
        print_volume_table(&vols.volumes);
    }
    Ok(())
}

pub async fn volume_attach(t: &Target, name: &str, node: &str, json_out: bool) -> anyhow::Result<()> {
    let mut c = t.connect().await?;
    let v = c
        .attach_volume(request(
            pb::AttachVolumeRequest { name: name.to_string(), node: node.to_string() },
            WRITE_DEADLINE,
        ))
        .await
        .map_err(status_err)?
        .into_inner();
    print_volume(&v, json_out);
    Ok(())
}

pub async fn volume_detach(t: &Target, name: &str, json_out: bool) -> anyhow::Result<()> {
    let mut c = t.connect().await?;
    let v = c
        .detach_volume(request(pb::VolumeRef { name: name.to_string() }, WRITE_DEADLINE))
        .await
        .map_err(status_err)?
        .into_inner();
    print_volume(&v, json_out);
    Ok(())
}

pub async fn volume_delete(t: &Target, name: &str) -> anyhow::Result<()> {
    let mut c = t.connect().await?;
    c.delete_volume(request(pb::VolumeRef { name: name.to_string() }, WRITE_DEADLINE))
        .await
        .map_err(status_err)?;
    println!("volume {name} deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert!(parse_size("1XB").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn an_unknown_rtt_is_a_dash_and_null() {
        assert_eq!(rtt_text(0), "-");
        assert_eq!(rtt_text(200_400), "200.4 ms");
        let w = pb::WitnessStatus { id: "w1".into(), reachable: true, ..Default::default() };
        let j = witness_json(&w, true);
        assert_eq!(j["rtt_us"], Value::Null);
        assert_eq!(j["rtt_measured_by"], Value::Null);
        let w = pb::WitnessStatus { rtt_us: 1500, rtt_last_us: 1400, rtt_measured_by: "a1".into(), ..w };
        assert_eq!(witness_json(&w, true)["rtt_us"], 1500);
        assert_eq!(witness_row(&w, false)[3], "1.5 ms");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y");
    }
}
