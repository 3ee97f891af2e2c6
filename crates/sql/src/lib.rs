//! What a refused database write means to a client, for every store on SQLite or
//! PostgreSQL: the coordinator, the event store and the shop's services. A full disk is
//! the operator's to fix and the client's to retry later (507 `storage_full`); anything
//! else the database did not keep is 503 `storage_unavailable`. Each of those stores
//! commits a request in one transaction, so either way nothing of the request was kept.
//! One place decides, so the stores cannot answer the same fault differently.

use http::StatusCode;

/// Why a database did not keep a write.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct Refused {
    /// The disk or the quota is full: room fixes it, not a retry now.
    pub full: bool,
    detail: String,
}

/// ENOSPC and EDQUOT: out of room, on the disk or in the quota.
const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

impl Refused {
    pub fn of(e: &sqlx::Error) -> Refused {
        let full = match e {
            sqlx::Error::Database(d) => {
                // SQLITE_FULL (13) or PostgreSQL's disk_full (53100). SQLite says
                // "database or disk is full" for both SQLITE_FULL and some I/O paths.
                d.code().is_some_and(|c| c == "13" || c == "53100")
                    || d.message().contains("disk is full")
            }
            sqlx::Error::Io(io) => matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT)),
            _ => false,
        };
        let detail = if full {
            format!(
                "the database's disk is full (ENOSPC, SQLITE_FULL or disk_full): nothing was kept; try again later ({e})"
            )
        } else {
            format!("the database did not take the write: {e}")
        };
        Refused { full, detail }
    }

    /// A refusal from something other than the database itself (its writer stopped).
    pub fn unavailable(detail: impl Into<String>) -> Refused {
        Refused {
            full: false,
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        if self.full {
            StatusCode::INSUFFICIENT_STORAGE
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }

    pub fn code(&self) -> &'static str {
        if self.full {
            "storage_full"
        } else {
            "storage_unavailable"
        }
    }
}

impl From<&sqlx::Error> for Refused {
    fn from(e: &sqlx::Error) -> Refused {
        Refused::of(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_room_is_full_and_the_rest_is_unavailable() {
        let io = |errno| sqlx::Error::Io(std::io::Error::from_raw_os_error(errno));
        for (e, full) in [
            (io(ENOSPC), true),
            (io(EDQUOT), true),
            (io(5), false), // EIO
            (sqlx::Error::PoolTimedOut, false),
        ] {
            let r = Refused::of(&e);
            assert_eq!(r.full, full, "{e}");
            let (status, code) = if full {
                (507, "storage_full")
            } else {
                (503, "storage_unavailable")
            };
            assert_eq!((r.status().as_u16(), r.code()), (status, code));
        }
    }
}
