//! Work over items on a few scoped threads, results in the items' order: how the
//! in-process runner trains a cohort and how personalisation fits and scores devices.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Result, SimError};

/// `f(i, item)` for every item, `workers` at a time, results in order. The first error
/// stops handing out work and is returned (the first in item order if several threads
/// failed); `what` names the work if a thread panics.
pub fn map_in_order<I: Sync, T: Send>(
    items: &[I],
    workers: usize,
    what: &str,
    f: impl Fn(usize, &I) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<T>>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers.min(items.len()).max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= items.len() {
                        break;
                    }
                    let out = f(i, &items[i]);
                    let failed = out.is_err();
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(out);
                    }
                    if failed {
                        next.store(items.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let results = results.into_inner().map_err(|_| SimError::Data(format!("a thread panicked: {what}")))?;
    if results.iter().any(|r| matches!(r, Some(Err(_)))) {
        let first = results.into_iter().flatten().find_map(Result::err);
        return Err(first.unwrap_or_else(|| SimError::Data(format!("{what} failed"))));
    }
    results.into_iter().map(|r| r.ok_or_else(|| SimError::Data(format!("{what}: an item was not done")))?).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_items_order_and_the_first_error_wins() {
        let items: Vec<u32> = (0..20).collect();
        let out = map_in_order(&items, 3, "squares", |_, &x| Ok(x * x)).expect("all done");
        assert_eq!(out, items.iter().map(|x| x * x).collect::<Vec<_>>());
        let err = map_in_order(
            &items,
            2,
            "failing",
            |i, _| {
                if i == 7 { Err(SimError::Data("item 7".into())) } else { Ok(i) }
            },
        )
        .expect_err("item 7 fails");
        assert_eq!(err.to_string(), SimError::Data("item 7".into()).to_string());
    }
}
