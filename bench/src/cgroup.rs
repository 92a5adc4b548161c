//! A CPU cap for one process: a cgroup v1 `cpu` group with a CFS quota, removed on drop.
//!
//! The scale-out phase gives each `orbit-worker` process a fixed slice of a core, so that adding
//! workers adds committers of a known size rather than competing for the same two cores as
//! PostgreSQL. cgroup v1 is what this machine mounts (`/sys/fs/cgroup/cpu`); creating a group
//! needs root.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the cgroup v1 `cpu` controller is mounted.
pub const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";

/// CFS bounds the kernel enforces (`kernel/sched/core.c`): a period of 1 ms to 1 s and a quota of
/// at least 1 ms. Checked here so that a bad flag gets a message that names it, not `EINVAL`.
pub fn check_quota(period_us: u64, quota_us: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1_000..=1_000_000).contains(&period_us),
        "the CPU period must be 1000 to 1000000 µs, not {period_us}"
    );
    anyhow::ensure!(
        quota_us >= 1_000,
        "the CPU quota must be at least 1000 µs, not {quota_us}"
    );
    Ok(())
}

/// A `cpu` cgroup made by this process. Dropping it moves any process still inside back to the
/// root group and removes the group, so that neither a failed run nor a finished one leaves a
/// capped process or a stale group behind.
#[derive(Debug)]
pub struct CpuCap {
    root: PathBuf,
    path: PathBuf,
}

impl CpuCap {
    /// Creates `<root>/<name>` capped at `quota_us` of CPU time per `period_us`.
    pub fn create(root: &Path, name: &str, period_us: u64, quota_us: u64) -> anyhow::Result<Self> {
        check_quota(period_us, quota_us)?;
        anyhow::ensure!(
            root.join("cpu.cfs_quota_us").exists(),
            "{} is not a cgroup v1 cpu controller (no cpu.cfs_quota_us): the scale-out phase \
             caps each worker with one",
            root.display()
        );
        let path = root.join(name);
        if let Err(e) = std::fs::create_dir(&path) {
            bail!(
                "cannot create the cgroup {}: {e}{}",
                path.display(),
                match e.kind() {
                    ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem =>
                        " (the scale-out phase caps each worker with a cgroup: run it as root)",
                    ErrorKind::AlreadyExists =>
                        " (left by an earlier run whose process still lives, or was killed: \
                         remove it with rmdir)",
                    _ => "",
                }
            );
        }
        // From here on, a failure removes the group again.
        let cap = CpuCap {
            root: root.to_owned(),
            path,
        };
        // The period first: the kernel checks the quota against the current period.
        cap.write("cpu.cfs_period_us", &period_us.to_string())?;
        cap.write("cpu.cfs_quota_us", &quota_us.to_string())?;
        Ok(cap)
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, file: &str, value: &str) -> anyhow::Result<()> {
        let path = self.path.join(file);
        std::fs::write(&path, value)
            .with_context(|| format!("cannot write {value} to {}", path.display()))
    }

    /// Moves the process `pid`, every thread of it, into the group.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        // `cgroup.procs` moves the whole thread group; `tasks` would move one thread, and the
        // worker's runtime threads already exist.
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The pids in the group.
    pub fn procs(&self) -> anyhow::Result<Vec<u32>> {
        let text = std::fs::read_to_string(self.path.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// How many periods the group ran out of quota in, and for how long in all: evidence that
    /// the cap bit.
    pub fn throttled(&self) -> anyhow::Result<(u64, Duration)> {
        let stat = std::fs::read_to_string(self.path.join("cpu.stat"))?;
        let field = |name: &str| -> u64 {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok((
            field("nr_throttled "),
            Duration::from_nanos(field("throttled_time ")),
        ))
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // A process killed just before is gone from the group once it has exited, which takes
        // a moment: keep moving what is left out and trying the removal for a while.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.procs().unwrap_or_default() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid.to_string());
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!(
                        "orbit-bench: cannot remove the cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_outside_the_kernel_bounds_are_refused() {
        assert!(check_quota(100_000, 10_000).is_ok());
        assert!(check_quota(100_000, 400_000).is_ok(), "several cores");
        let low = check_quota(100_000, 999).unwrap_err().to_string();
        assert!(low.contains("at least 1000"), "{low}");
        let period = check_quota(999, 10_000).unwrap_err().to_string();
        assert!(period.contains("period"), "{period}");
        assert!(check_quota(1_000_001, 10_000).is_err());
    }

    #[test]
    fn a_directory_that_is_no_cpu_controller_is_refused() {
        let dir = std::env::temp_dir().join(format!("orbit-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = CpuCap::create(&dir, "g", 100_000, 10_000).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.to_string().contains("not a cgroup v1 cpu controller"),
            "{e}"
        );
    }

    /// Against the real controller (the benchmark runs as root on cgroup v1): a process put in
    /// the group is capped there, and dropping the group moves it out and removes the group.
    #[test]
    fn caps_a_process_and_removes_its_group() {
        let name = format!("orbit-bench-test-{}", std::process::id());
        let cap = CpuCap::create(Path::new(CPU_ROOT), &name, 100_000, 10_000).unwrap();
        let read = |f: &str| std::fs::read_to_string(cap.path().join(f)).unwrap();
        assert_eq!(read("cpu.cfs_period_us").trim(), "100000");
        assert_eq!(read("cpu.cfs_quota_us").trim(), "10000");

        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        cap.add(child.id()).unwrap();
        assert_eq!(cap.procs().unwrap(), vec![child.id()]);
        let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(
            membership
                .lines()
                .any(|l| l.ends_with(&format!(":cpu:/{name}"))),
            "{membership}"
        );

        let path = cap.path().to_owned();
        drop(cap);
        assert!(!path.exists(), "{} was not removed", path.display());
        let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(
            membership.lines().any(|l| l.ends_with(":cpu:/")),
            "{membership}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
