//! Linux `/proc` readers: own CPU time, a process tree's CPU time and memory, machine CPU.
//!
//! Everything here is plain file parsing; no `unsafe` and no libc.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::fs;

/// Linux reports process times in USER_HZ clock ticks. USER_HZ is part of the kernel ABI and is
/// 100 on every mainstream architecture (it is independent of the kernel's internal HZ), so it is
/// a constant here instead of a `sysconf(_SC_CLK_TCK)` call that would need libc.
pub const USER_HZ: f64 = 100.0;

/// Fields of `/proc/PID/stat` that come after the parenthesised command name.
/// Index 0 is field 3 (`state`) of proc(5).
fn stat_fields(pid: &str) -> Result<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let Some(close) = text.rfind(')') else {
        bail!("malformed /proc/{pid}/stat");
    };
    // `state` is a letter; map it to 0 so that the indices stay aligned with proc(5).
    Ok(text[close + 1..].split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0)).collect())
}

// Indices into `stat_fields` (proc(5) field number minus 3).
const PPID: usize = 1; // field 4
const UTIME: usize = 11; // field 14
const STIME: usize = 12; // field 15
const CUTIME: usize = 13; // field 16
const CSTIME: usize = 14; // field 17

fn field(fields: &[u64], i: usize) -> u64 {
    fields.get(i).copied().unwrap_or(0)
}

/// CPU seconds (user + system, all threads) used by this process so far.
pub fn self_cpu_secs() -> Result<f64> {
    let f = stat_fields("self")?;
    Ok((field(&f, UTIME) + field(&f, STIME)) as f64 / USER_HZ)
}

/// Machine-wide CPU time from `/proc/stat`: (busy seconds, total seconds), summed over all CPUs.
pub fn machine_cpu_secs() -> Result<(f64, f64)> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        bail!("no aggregate cpu line in /proc/stat");
    };
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already inside user/nice).
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let total = busy + get(3) + get(4);
    Ok((busy as f64 / USER_HZ, total as f64 / USER_HZ))
}

/// `root` and all of its live descendants.
pub fn tree_pids(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(pid) = name.parse::<u32>() else {
                continue;
            };
            // Processes can exit while we scan: ignore the ones that vanished.
            if let Ok(f) = stat_fields(name) {
                children.entry(field(&f, PPID) as u32).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids.iter().copied());
        }
        i += 1;
    }
    out
}

/// CPU seconds used by a process tree: for every live member, its own user+system time plus the
/// time of its already reaped children (cutime/cstime). Processes that exited and were reaped
/// by a member of the tree are therefore still counted (Dovecot's master reaps one pop3 and one
/// pop3-login process per session).
pub fn tree_cpu_secs(root: u32) -> Result<f64> {
    let pids = tree_pids(root);
    let mut ticks = 0u64;
    let mut found_root = false;
    for pid in pids {
        if let Ok(f) = stat_fields(&pid.to_string()) {
            found_root |= pid == root;
            ticks += field(&f, UTIME) + field(&f, STIME) + field(&f, CUTIME) + field(&f, CSTIME);
        }
    }
    if !found_root {
        bail!("process {root} not found");
    }
    Ok(ticks as f64 / USER_HZ)
}

/// Memory of a process tree, summed from `/proc/PID/smaps_rollup` (KiB).
#[derive(Debug, Default, Clone)]
pub struct TreeMem {
    pub procs: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Private_Clean + Private_Dirty (USS).
    pub uss_kib: u64,
    /// Per command name (`/proc/PID/comm`): (processes, PSS KiB).
    pub by_comm: BTreeMap<String, (u64, u64)>,
}

impl TreeMem {
    /// "pop3:2000:1068000,pop3-login:2000:2700000" (name:processes:PSS KiB).
    pub fn by_comm_field(&self) -> String {
        let parts: Vec<String> = self
            .by_comm
            .iter()
            .map(|(name, (n, pss))| format!("{}:{n}:{pss}", name.replace([' ', ',', ':', '='], "_")))
            .collect();
        parts.join(",")
    }
}

pub fn tree_mem(root: u32) -> Result<TreeMem> {
    let mut m = TreeMem::default();
    for pid in tree_pids(root) {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            if pid == root {
                bail!("cannot read /proc/{root}/smaps_rollup");
            }
            continue;
        };
        m.procs += 1;
        let comm =
            fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim().to_owned()).unwrap_or_else(|_| "?".into());
        let mut pss = 0;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(key), Some(val)) = (it.next(), it.next()) else {
                continue;
            };
            let val: u64 = val.parse().unwrap_or(0);
            match key {
                "Rss:" => m.rss_kib += val,
                "Pss:" => pss += val,
                "Private_Clean:" | "Private_Dirty:" => m.uss_kib += val,
                _ => {}
            }
        }
        m.pss_kib += pss;
        let e = m.by_comm.entry(comm).or_default();
        e.0 += 1;
        e.1 += pss;
    }
    Ok(m)
}

/// CPU counters taken at one instant, to be subtracted from a later sample.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub client: f64,
    pub machine_busy: f64,
    pub machine_total: f64,
    pub server: Option<f64>,
}

impl CpuSample {
    pub fn take(server_pid: Option<u32>) -> Result<Self> {
        let (machine_busy, machine_total) = machine_cpu_secs()?;
        Ok(Self {
            client: self_cpu_secs()?,
            machine_busy,
            machine_total,
            server: match server_pid {
                Some(pid) => Some(tree_cpu_secs(pid)?),
                None => None,
            },
        })
    }

    /// `key=value` fields for the interval from `self` to `later`.
    pub fn fields_until(&self, later: &CpuSample) -> String {
        let client = later.client - self.client;
        let busy = later.machine_busy - self.machine_busy;
        let total = later.machine_total - self.machine_total;
        let mut s = format!(
            "client_cpu_s={client:.2} machine_busy_s={busy:.2} machine_total_s={total:.2} client_share_of_busy={:.3}",
            if busy > 0.0 { client / busy } else { 0.0 }
        );
        if let (Some(a), Some(b)) = (self.server, later.server) {
            s.push_str(&format!(" server_cpu_s={:.2}", b - a));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_readers_work() {
        assert!(self_cpu_secs().unwrap() >= 0.0);
        let (busy, total) = machine_cpu_secs().unwrap();
        assert!(total >= busy && total > 0.0);
        let me = std::process::id();
        assert!(tree_pids(me).contains(&me));
        assert!(tree_cpu_secs(me).unwrap() >= 0.0);
        let m = tree_mem(me).unwrap();
        assert_eq!(m.procs, 1);
        assert!(m.rss_kib > 0 && m.pss_kib > 0);
    }
}
