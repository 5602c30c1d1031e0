//! ethtool's generic netlink family (the `ethtool` crate): the features (`ethtool -k`) and
//! channel counts (`ethtool -l`) of an interface in the calling thread's namespace. The crate is
//! async; each query runs on a current-thread runtime of its own, so the callers (start-up,
//! reload, a thread inside a peer's namespace) need no runtime and may not be on one.

use futures_util::StreamExt as _;

use super::NetdevError;

/// Combined channel counts: in use and the device's maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channels {
    pub combined: u32,
    pub combined_max: u32,
}

fn run<T>(
    iface: &str,
    query: impl AsyncFnOnce(ethtool::EthtoolHandle) -> Result<T, ethtool::EthtoolError>,
) -> Result<T, NetdevError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NetdevError::Io {
            op: "starting the runtime of an ethtool request",
            source,
        })?;
    rt.block_on(async {
        let (connection, handle, _) =
            ethtool::new_connection().map_err(|source| NetdevError::Io {
                op: "opening an ethtool netlink socket",
                source,
            })?;
        let conn = tokio::spawn(connection);
        let out = query(handle).await.map_err(|e| NetdevError::Ethtool {
            iface: iface.to_owned(),
            message: e.to_string(),
        });
        conn.abort();
        out
    })
}

/// Whether `rx-gro` is active on `iface`.
///
/// # Errors
/// The ethtool request failed (no such interface, no ethtool netlink family).
pub fn gro_active(iface: &str) -> Result<bool, NetdevError> {
    run(iface, async |mut handle| {
        let mut answers = handle.feature().get(Some(iface)).execute().await?;
        let mut gro = false;
        while let Some(msg) = answers.next().await {
            for attr in &msg?.payload.nlas {
                if let ethtool::EthtoolAttr::Feature(ethtool::EthtoolFeatureAttr::Active(bits)) =
                    attr
                {
                    gro |= bits.iter().any(|b| b.name == "rx-gro" && b.value);
                }
            }
        }
        Ok(gro)
    })
}

/// The combined channel counts of `iface` (`None`: the driver reports none).
///
/// # Errors
/// The ethtool request failed.
pub fn channels(iface: &str) -> Result<Option<Channels>, NetdevError> {
    run(iface, async |mut handle| {
        let mut answers = handle.channel().get(Some(iface)).execute().await?;
        let (mut combined, mut max) = (None, None);
        while let Some(msg) = answers.next().await {
            for attr in &msg?.payload.nlas {
                match attr {
                    ethtool::EthtoolAttr::Channel(ethtool::EthtoolChannelAttr::CombinedCount(
                        n,
                    )) => combined = Some(*n),
                    ethtool::EthtoolAttr::Channel(ethtool::EthtoolChannelAttr::CombinedMax(n)) => {
                        max = Some(*n);
                    }
                    _ => {}
                }
            }
        }
        Ok(combined.zip(max).map(|(combined, combined_max)| Channels {
            combined,
            combined_max,
        }))
    })
}
