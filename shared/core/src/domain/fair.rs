//! Fair shares: which waiting directory a free worker serves next (docs/concurrency.md, "Fair
//! shares").
//!
//! Start-time fair queuing, at two levels: among organizations, weighted, then among one
//! organization's directories, equally. Each organization has a *pass*, the virtual time at
//! which its next chunk starts; running a chunk of `rows` rows advances it by `rows /
//! (chunk_rows × weight)`, so a full chunk costs `1 / weight`. A free worker serves the waiting
//! organization with the lowest pass. The service keeps a virtual time too, the start of the
//! last chunk served; a pass is never taken below one chunk behind it, so an organization that
//! was idle cannot bank credit: it comes back one chunk ahead of the others at most, and is
//! served next. Directories of an organization do the same against the organization's own
//! virtual time.
//!
//! The passes live in the database (`scheduler_shares`), read before and advanced after each
//! claim, by every worker. Two workers choosing at once may both see the same passes; each
//! advance adds its own charge, so they blur the order by a chunk and never lose a charge.

use uuid::Uuid;

/// The credit an idle organization (or directory) returns with, in full chunks: a new
/// tenant's first two chunks run before the incumbent's next, so a small file's chunks run
/// side by side as they would on an idle service.
pub const RETURN_CREDIT: f64 = 1.0;

/// A directory with a chunk ready to run, and what choosing it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub organization: Uuid,
    pub directory: Uuid,
    /// The organization's weight (at least 1).
    pub weight: u32,
    /// When the directory's oldest ready chunk's source was created: ties go to the oldest.
    pub since_ms: i64,
}

/// A pass, as stored: `pass` is where the owner's next chunk starts; `vtime`, for an
/// organization, the virtual time of its directories (and for the service, its own).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pass {
    pub pass: f64,
    pub vtime: f64,
}

/// How a choice moves the passes: each row's pass becomes `max(pass, floor) + charge`, its
/// vtime `max(vtime, vtime_floor)`. Written as floors and charges, not as results, so that two
/// workers advancing the same row at once both count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Advance {
    pub id: Uuid,
    pub floor: f64,
    pub charge: f64,
    pub vtime_floor: f64,
}

/// The id under which the service's own virtual time is kept.
pub const SERVICE: Uuid = Uuid::nil();

/// The passes the scheduler reads: the service's, and those of the organizations and
/// directories waiting (missing ones are new, at zero).
pub trait Passes {
    fn pass(&self, id: Uuid) -> Pass;
}

impl Passes for std::collections::HashMap<Uuid, Pass> {
    fn pass(&self, id: Uuid) -> Pass {
        self.get(&id).copied().unwrap_or_default()
    }
}

impl AsRef<Waiting> for Waiting {
    fn as_ref(&self) -> &Waiting {
        self
    }
}

/// The waiting directory to serve next: the organization with the lowest pass (taken no lower
/// than its return credit below the service's virtual time), then its directory with the
/// lowest pass the same way; ties to the oldest waiting. `None` when nothing waits. `waiting`
/// may be anything that carries a [`Waiting`], so that the choice is one of the caller's own.
pub fn choose<'a, W: AsRef<Waiting>>(waiting: &'a [W], passes: &impl Passes) -> Option<&'a W> {
    let service = passes.pass(SERVICE).vtime;
    let start = |id: Uuid, vtime: f64| passes.pass(id).pass.max(vtime - RETURN_CREDIT);
    let by_start = |a: &(f64, i64), b: &(f64, i64)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    let organization = waiting
        .iter()
        .map(AsRef::as_ref)
        .map(|w| (w.organization, (start(w.organization, service), w.since_ms)))
        .min_by(|a, b| by_start(&a.1, &b.1))?
        .0;
    let inner = passes.pass(organization).vtime;
    waiting
        .iter()
        .filter(|w| w.as_ref().organization == organization)
        .min_by(|a, b| {
            let (a, b) = (a.as_ref(), b.as_ref());
            by_start(
                &(start(a.directory, inner), a.since_ms),
                &(start(b.directory, inner), b.since_ms),
            )
        })
}

/// What running `rows` rows of `chosen` costs, as advances of its organization's pass, its
/// directory's pass, and the virtual times above them. `chunk_rows` makes a full chunk cost
/// 1 (divided by the weight), whatever the configured chunk size.
pub fn charge(chosen: &Waiting, passes: &impl Passes, rows: u64, chunk_rows: u64) -> [Advance; 3] {
    let cost = rows.max(1) as f64 / chunk_rows.max(1) as f64;
    let service = passes.pass(SERVICE).vtime;
    let org = passes.pass(chosen.organization);
    let org_floor = service - RETURN_CREDIT;
    let org_start = org.pass.max(org_floor);
    let dir_floor = org.vtime - RETURN_CREDIT;
    let dir_start = passes.pass(chosen.directory).pass.max(dir_floor);
    [
        Advance {
            id: SERVICE,
            floor: f64::MIN,
            charge: 0.0,
            vtime_floor: org_start,
        },
        Advance {
            id: chosen.organization,
            floor: org_floor,
            charge: cost / f64::from(chosen.weight.max(1)),
            vtime_floor: dir_start,
        },
        Advance {
            id: chosen.directory,
            floor: dir_floor,
            charge: cost,
            vtime_floor: f64::MIN,
        },
    ]
}

/// Applies advances as the store does (for the tests and the simulation).
pub fn apply(passes: &mut std::collections::HashMap<Uuid, Pass>, advances: &[Advance]) {
    for a in advances {
        let p = passes.entry(a.id).or_default();
        p.pass = p.pass.max(a.floor) + a.charge;
        p.vtime = p.vtime.max(a.vtime_floor);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Serves `slots` chunks one after another from backlogs that never run dry, starting
    /// from `passes`; returns how many each organization got.
    fn serve(
        waiting: &[Waiting],
        passes: &mut HashMap<Uuid, Pass>,
        slots: usize,
    ) -> HashMap<Uuid, usize> {
        let mut served = HashMap::new();
        for _ in 0..slots {
            let chosen = choose(waiting, passes).unwrap().clone();
            let advances = charge(&chosen, passes, 100, 100);
            apply(passes, &advances);
            *served.entry(chosen.directory).or_default() += 1;
        }
        served
    }

    fn waiting(org: u128, dir: u128, weight: u32, since_ms: i64) -> Waiting {
        Waiting {
            organization: id(org),
            directory: id(dir),
            weight,
            since_ms,
        }
    }

    #[test]
    fn nothing_waiting_chooses_nothing() {
        assert_eq!(choose::<Waiting>(&[], &HashMap::new()), None);
    }

    #[test]
    fn equal_weights_alternate() {
        let w = [waiting(1, 11, 1, 0), waiting(2, 21, 1, 5)];
        let mut passes = HashMap::new();
        let served = serve(&w, &mut passes, 100);
        assert_eq!(served[&id(11)], 50);
        assert_eq!(served[&id(21)], 50);
    }

    #[test]
    fn weights_set_the_ratio() {
        let w = [waiting(1, 11, 1, 0), waiting(2, 21, 3, 0)];
        let mut passes = HashMap::new();
        let served = serve(&w, &mut passes, 400);
        // A third of a pass is not exact in floating point: a chunk either way.
        assert!(served[&id(11)].abs_diff(100) <= 1, "{served:?}");
    }

    #[test]
    fn a_newcomer_is_served_next_however_long_the_backlog_ran() {
        let a = waiting(1, 11, 1, 0);
        let mut passes = HashMap::new();
        // A has had the service to itself for 10,000 chunks.
        serve(std::slice::from_ref(&a), &mut passes, 10_000);
        let b = waiting(2, 21, 1, 1_000_000);
        let both = [a, b];
        // B's first two chunks come before A's next (the return credit), then they alternate.
        let order: Vec<Uuid> = (0..6)
            .map(|_| {
                let chosen = choose(&both, &passes).unwrap().clone();
                let advances = charge(&chosen, &passes, 100, 100);
                apply(&mut passes, &advances);
                chosen.directory
            })
            .collect();
        assert_eq!(order, [21, 21, 11, 21, 11, 21].map(id));
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let a = waiting(1, 11, 1, 0);
        let b = waiting(2, 21, 1, 0);
        let mut passes = HashMap::new();
        serve(&[a.clone(), b.clone()], &mut passes, 10);
        // B goes idle while A runs 1,000 chunks, then returns: it gets its return credit and
        // its fair half, not 1,000 chunks in a row.
        serve(std::slice::from_ref(&a), &mut passes, 1_000);
        let served = serve(&[a, b], &mut passes, 20);
        assert!((10..=12).contains(&served[&id(21)]), "{served:?}");
    }

    #[test]
    fn directories_of_one_organization_share_its_part() {
        let w = [
            waiting(1, 11, 1, 0),
            waiting(1, 12, 1, 0),
            waiting(2, 21, 1, 0),
        ];
        let mut passes = HashMap::new();
        let served = serve(&w, &mut passes, 400);
        assert_eq!(served[&id(21)], 200);
        assert_eq!(served[&id(11)], 100);
        assert_eq!(served[&id(12)], 100);
    }

    #[test]
    fn ties_go_to_the_oldest() {
        let w = [waiting(2, 21, 1, 7), waiting(1, 11, 1, 3)];
        assert_eq!(choose(&w, &HashMap::new()).unwrap().directory, id(11));
    }

    #[test]
    fn a_small_chunk_costs_its_rows() {
        let w = [waiting(1, 11, 1, 0), waiting(2, 21, 1, 0)];
        let mut passes = HashMap::new();
        let mut served: HashMap<Uuid, u64> = HashMap::new();
        for _ in 0..300 {
            let chosen = choose(&w, &passes).unwrap().clone();
            // Organization 2's chunks are a tenth of organization 1's.
            let rows = if chosen.organization == id(1) {
                100
            } else {
                10
            };
            let advances = charge(&chosen, &passes, rows, 100);
            apply(&mut passes, &advances);
            *served.entry(chosen.organization).or_default() += rows;
        }
        let (one, two) = (served[&id(1)] as f64, served[&id(2)] as f64);
        assert!((one / two - 1.0).abs() < 0.1, "{served:?}");
    }
}
