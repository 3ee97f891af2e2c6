use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `max` calls in flight; the next is refused at once (no queue), so a slow
/// upstream costs its callers a 503, not their threads.
#[derive(Debug, Clone)]
pub struct Bulkhead {
    max: usize,
    sem: Arc<Semaphore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead full: {max} requests already in flight")]
pub struct BulkheadFull {
    pub max: usize,
}

/// Held for the duration of a call.
#[derive(Debug)]
pub struct BulkheadPermit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Bulkhead {
    pub fn new(max: usize) -> Bulkhead {
        Bulkhead {
            max,
            sem: Arc::new(Semaphore::new(max)),
        }
    }

    pub fn try_acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        self.sem
            .clone()
            .try_acquire_owned()
            .map(BulkheadPermit)
            .map_err(|_| BulkheadFull { max: self.max })
    }

    pub fn in_flight(&self) -> usize {
        self.max - self.sem.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_max() {
        let b = Bulkhead::new(2);
        let p1 = b.try_acquire().unwrap();
        let _p2 = b.try_acquire().unwrap();
        assert_eq!(b.try_acquire().unwrap_err(), BulkheadFull { max: 2 });
        assert_eq!(b.in_flight(), 2);
        drop(p1);
        assert!(b.try_acquire().is_ok());
    }
}
