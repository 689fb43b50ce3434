//! Writes each message as an `.eml` file, for trying the daemon out with nothing else
//! installed. Chosen only by `delivery.transport = "pickup"`.

use std::path::PathBuf;

use super::Outcome;
use crate::render::Rendered;

#[derive(Debug, Clone)]
pub struct Pickup {
    dir: PathBuf,
}

impl Pickup {
    pub fn new(dir: PathBuf) -> Pickup {
        Pickup { dir }
    }

    pub async fn send(&self, message: &Rendered) -> Outcome {
        let name = format!("{}.eml", file_stem(&message.bytes));
        let path = self.dir.join(&name);
        let partial = self.dir.join(format!(".{name}.partial"));
        let written = async {
            tokio::fs::create_dir_all(&self.dir).await?;
            tokio::fs::write(&partial, &message.bytes).await?;
            // Readers never see half a message.
            tokio::fs::rename(&partial, &path).await
        };
        match written.await {
            Ok(()) => Outcome::Sent {
                code: None,
                reply: format!("written to {}", path.display()),
            },
            Err(e) => Outcome::Transient {
                reason: format!("cannot write to {}: {e}", self.dir.display()),
                code: None,
                retry_after: None,
            },
        }
    }
}

/// The Message-ID without its brackets and anything a file name cannot hold, so the
/// same message always lands in the same file.
fn file_stem(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64 * 1024)]);
    let id = text
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.split_once(':')
                .filter(|(name, _)| name.eq_ignore_ascii_case("message-id"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)));
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
        .collect()
}
