//! Each organization's backlog, for the per-organization gauges ([`crate::Stats::organization_backlog`]):
//! the rows it has queued, the chunks it has ready and how long it has waited, the
//! organizations waiting longest one by one and the rest summed, so the gauges' label set
//! stays bounded whatever the number of tenants.
//!
//! **Waiting** is measured per organization, not per chunk: from when its oldest ready chunk
//! became ready (a chunk is ready when it is pending and past its `not_before_ms`; it became
//! ready at its `not_before_ms` when a failed attempt set one, else when its source was
//! uploaded), or from the organization's last progress (the latest `updated_ms` of its
//! unfinished sources: a claim, every committed slice, a retry), whichever is later. The age of
//! the oldest ready chunk alone would be the age of the backlog: an organization whose one big
//! upload drains steadily would look starved for as long as the upload takes. Measured from
//! its last progress as well, an organization that is being served waits a few seconds at
//! most, and one that waits long is one no worker turns to.

use std::collections::HashMap;
use std::time::Duration;

use uuid::Uuid;

/// One organization with unfinished work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrganizationBacklog {
    pub organization_id: Uuid,
    /// Rows of its pending and processing sources not yet processed.
    pub queued_rows: u64,
    /// Its chunks pending and past their `not_before_ms`: what a worker could take now.
    pub ready_chunks: u64,
    /// How long it has had ready chunks without progress (module docs); zero with none ready.
    pub wait: Duration,
}

/// The organizations beyond the top, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BacklogRest {
    pub organizations: u64,
    pub queued_rows: u64,
    pub ready_chunks: u64,
    /// The longest wait among them.
    pub max_wait: Duration,
}

/// Every organization with unfinished work: the `top` waiting longest, the rest summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Longest wait first; organizations with nothing ready follow, most rows queued first.
    pub top: Vec<OrganizationBacklog>,
    pub rest: BacklogRest,
    /// Organizations with ready chunks, top and rest.
    pub waiting: u64,
    /// The longest wait of any organization, top or rest.
    pub max_wait: Duration,
}

/// Per organization: rows queued and the latest progress of its unfinished sources.
pub(crate) struct Queued {
    pub organization_id: Uuid,
    pub queued_rows: i64,
    pub progress_ms: i64,
}

/// Per organization: its ready chunks and when the oldest of them became ready.
pub(crate) struct Ready {
    pub organization_id: Uuid,
    pub ready_chunks: i64,
    pub ready_since_ms: i64,
}

/// Puts the two reads together at `now_ms`, keeping `top` organizations apart.
pub(crate) fn summarize(
    queued: Vec<Queued>,
    ready: Vec<Ready>,
    now_ms: i64,
    top: usize,
) -> Backlog {
    let ready: HashMap<Uuid, Ready> = ready.into_iter().map(|r| (r.organization_id, r)).collect();
    let mut all: Vec<OrganizationBacklog> = queued
        .into_iter()
        .map(|q| {
            let (ready_chunks, wait) = match ready.get(&q.organization_id) {
                Some(r) => {
                    let since = r.ready_since_ms.max(q.progress_ms);
                    (
                        r.ready_chunks.max(0) as u64,
                        Duration::from_millis((now_ms - since).max(0) as u64),
                    )
                }
                None => (0, Duration::ZERO),
            };
            OrganizationBacklog {
                organization_id: q.organization_id,
                queued_rows: q.queued_rows.max(0) as u64,
                ready_chunks,
                wait,
            }
        })
        .collect();
    all.sort_by(|a, b| {
        (b.ready_chunks > 0)
            .cmp(&(a.ready_chunks > 0))
            .then(b.wait.cmp(&a.wait))
            .then(b.queued_rows.cmp(&a.queued_rows))
            .then(a.organization_id.cmp(&b.organization_id))
    });
    let waiting = all.iter().filter(|o| o.ready_chunks > 0).count() as u64;
    let max_wait = all.iter().map(|o| o.wait).max().unwrap_or_default();
    let rest_orgs = all.split_off(top.min(all.len()));
    let rest = rest_orgs
        .iter()
        .fold(BacklogRest::default(), |mut rest, o| {
            rest.organizations += 1;
            rest.queued_rows += o.queued_rows;
            rest.ready_chunks += o.ready_chunks;
            rest.max_wait = rest.max_wait.max(o.wait);
            rest
        });
    Backlog {
        top: all,
        rest,
        waiting,
        max_wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn the_longest_waits_come_first_and_the_rest_is_summed() {
        let queued = vec![
            Queued {
                organization_id: org(1),
                queued_rows: 100,
                progress_ms: 1_000,
            },
            Queued {
                organization_id: org(2),
                queued_rows: 50,
                progress_ms: 1_000,
            },
            // Nothing ready: all its chunks run.
            Queued {
                organization_id: org(3),
                queued_rows: 900,
                progress_ms: 9_000,
            },
            // Served a moment ago: its old chunk waits for its own turn, not for a worker.
            Queued {
                organization_id: org(4),
                queued_rows: 10,
                progress_ms: 9_500,
            },
        ];
        let ready = vec![
            Ready {
                organization_id: org(1),
                ready_chunks: 3,
                ready_since_ms: 2_000,
            },
            Ready {
                organization_id: org(2),
                ready_chunks: 1,
                ready_since_ms: 500,
            },
            Ready {
                organization_id: org(4),
                ready_chunks: 2,
                ready_since_ms: 100,
            },
        ];
        let backlog = summarize(queued, ready, 10_000, 2);
        let ids: Vec<_> = backlog.top.iter().map(|o| o.organization_id).collect();
        assert_eq!(ids, [org(2), org(1)]);
        assert_eq!(
            backlog.top[0].wait,
            Duration::from_millis(9_000),
            "since the later of ready and progress"
        );
        assert_eq!(backlog.top[1].wait, Duration::from_millis(8_000));
        assert_eq!(
            backlog.rest,
            BacklogRest {
                organizations: 2,
                queued_rows: 910,
                ready_chunks: 2,
                max_wait: Duration::from_millis(500),
            }
        );
        assert_eq!(
            (backlog.waiting, backlog.max_wait),
            (3, Duration::from_millis(9_000))
        );
    }

    #[test]
    fn organizations_with_nothing_ready_follow_by_rows_and_a_zero_top_sums_everything() {
        let queued = vec![
            Queued {
                organization_id: org(1),
                queued_rows: 5,
                progress_ms: 0,
            },
            Queued {
                organization_id: org(2),
                queued_rows: 7,
                progress_ms: 0,
            },
        ];
        let backlog = summarize(queued, Vec::new(), 10_000, 5);
        let ids: Vec<_> = backlog.top.iter().map(|o| o.organization_id).collect();
        assert_eq!(ids, [org(2), org(1)]);
        assert_eq!((backlog.waiting, backlog.max_wait), (0, Duration::ZERO));

        let queued = vec![Queued {
            organization_id: org(1),
            queued_rows: 5,
            progress_ms: 0,
        }];
        let ready = vec![Ready {
            organization_id: org(1),
            ready_chunks: 1,
            ready_since_ms: 4_000,
        }];
        let backlog = summarize(queued, ready, 10_000, 0);
        assert!(backlog.top.is_empty());
        assert_eq!(backlog.rest.organizations, 1);
        assert_eq!(backlog.max_wait, Duration::from_secs(6));
    }
}
