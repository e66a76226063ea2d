//! Which member reads which queue: an even spread, sticky where possible. Pure.
//!
//! Per topic, the members subscribed to it share its queues: each gets `n / m` or one more.
//! The members that get one more are those that already held the most of the topic, so a
//! rebalance moves as few queues as it can. A queue keeps its previous owner while that owner
//! is still subscribed and under its share; the rest go, in queue order, to the member with the
//! fewest queues of the topic (ties by name).

use std::collections::BTreeMap;

/// A queue of a topic.
pub type QueueKey = (String, u32);

/// `topics`: each topic with its queue count and its subscribed members (any order).
/// `previous`: the last assignment. Returns queue -> member for every queue that has a
/// subscribed member.
pub fn assign(
    topics: &BTreeMap<String, (u32, Vec<String>)>,
    previous: &BTreeMap<QueueKey, String>,
) -> BTreeMap<QueueKey, String> {
    let mut out = BTreeMap::new();
    for (topic, (queues, members)) in topics {
        let mut members = members.clone();
        members.sort();
        members.dedup();
        if members.is_empty() || *queues == 0 {
            continue;
        }
        let held = |m: &String| {
            (0..*queues)
                .filter(|q| previous.get(&(topic.clone(), *q)) == Some(m))
                .count()
        };
        let base = *queues as usize / members.len();
        let extra = *queues as usize % members.len();
        // Who gets one more: the members holding the most already (ties by name).
        let mut by_held: Vec<&String> = members.iter().collect();
        by_held.sort_by_key(|m| std::cmp::Reverse(held(m)));
        let cap: BTreeMap<&String, usize> = by_held
            .iter()
            .enumerate()
            .map(|(i, m)| (*m, base + usize::from(i < extra)))
            .collect();
        let mut count: BTreeMap<&String, usize> = members.iter().map(|m| (m, 0)).collect();
        let mut free = Vec::new();
        for q in 0..*queues {
            let key = (topic.clone(), q);
            match previous
                .get(&key)
                .and_then(|p| members.iter().find(|m| *m == p))
            {
                Some(owner) if count[owner] < cap[owner] => {
                    *count.get_mut(owner).expect("a member") += 1;
                    out.insert(key, owner.clone());
                }
                _ => free.push(key),
            }
        }
        for key in free {
            let owner = members
                .iter()
                .filter(|m| count[m] < cap[m])
                .min_by_key(|m| count[m])
                .expect("the caps add up to the queue count");
            *count.get_mut(owner).expect("a member") += 1;
            out.insert(key, owner.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(spec: &[(&str, u32, &[&str])]) -> BTreeMap<String, (u32, Vec<String>)> {
        spec.iter()
            .map(|(t, n, ms)| {
                (
                    t.to_string(),
                    (*n, ms.iter().map(|m| m.to_string()).collect()),
                )
            })
            .collect()
    }

    fn per_member(a: &BTreeMap<QueueKey, String>) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for m in a.values() {
            *out.entry(m.clone()).or_default() += 1;
        }
        out
    }

    #[test]
    fn every_queue_gets_one_member_and_the_spread_is_even() {
        for members in 1..=9usize {
            for queues in 0..=20u32 {
                let names: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let a = assign(&topics(&[("t", queues, &names)]), &BTreeMap::new());
                assert_eq!(a.len(), queues as usize);
                let counts = per_member(&a);
                let (lo, hi) = (
                    counts.values().min().copied().unwrap_or(0),
                    counts.values().max().copied().unwrap_or(0),
                );
                assert!(
                    hi - lo <= 1,
                    "{members} members, {queues} queues: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn a_join_moves_only_what_the_new_member_needs_and_a_leave_only_what_was_held() {
        let t2 = topics(&[("t", 12, &["a", "b"])]);
        let first = assign(&t2, &BTreeMap::new());
        let t3 = topics(&[("t", 12, &["a", "b", "c"])]);
        let second = assign(&t3, &first);
        let moved = first.iter().filter(|(k, m)| second[*k] != **m).count();
        assert_eq!(moved, 4, "c takes 4 queues, nothing else moves");
        let t2b = topics(&[("t", 12, &["a", "c"])]);
        let third = assign(&t2b, &second);
        let moved: Vec<_> = second.iter().filter(|(k, m)| third[*k] != **m).collect();
        assert!(moved.iter().all(|(_, m)| m.as_str() == "b"), "{moved:?}");
        assert_eq!(
            per_member(&third).values().copied().collect::<Vec<_>>(),
            [6, 6]
        );
    }

    #[test]
    fn members_get_only_topics_they_subscribe_to() {
        let a = assign(
            &topics(&[("x", 4, &["a"]), ("y", 4, &["a", "b"]), ("z", 2, &[])]),
            &BTreeMap::new(),
        );
        assert!(a.iter().filter(|(k, _)| k.0 == "x").all(|(_, m)| m == "a"));
        assert_eq!(a.keys().filter(|k| k.0 == "y").count(), 4);
        assert!(a.keys().all(|k| k.0 != "z"));
    }
}
