//! `-w FILE.pcapng`: the captured FIN/RST packets (headers only) with a comment on each naming
//! the process and the event it joined, so Wireshark and tshark show who sent it. libpcap cannot
//! write packet comments; the pcap-file crate writes pcapng. Each interface the packets crossed
//! has its own interface block, named (`any` captures many), so Wireshark shows where each
//! packet was seen.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet, VecDeque},
    fs::File,
    io::BufWriter,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};

use crate::{capture::WirePacket, timeline::Timeline};

/// Packets remembered so that a packet carried by both ends' events is written once.
const REMEMBERED: usize = 65_536;

/// Identity of a written packet: path, segment and capture time.
type PacketId = (
    std::net::SocketAddr,
    std::net::SocketAddr,
    u32,
    u32,
    u8,
    u64,
);

/// A packet waiting to be written: (wall-clock capture time, interface, headers, comment).
type Held = (u64, Arc<str>, Arc<[u8]>, String);

/// Writes packets in capture order (see `timeline`).
pub struct PcapngOut {
    writer: PcapNgWriter<BufWriter<File>>,
    written: HashSet<PacketId>,
    order: VecDeque<PacketId>,
    held: Timeline<Held>,
    /// The capture's link type, every interface block's but those in `linktypes`.
    linktype: DataLink,
    linktypes: HashMap<Arc<str>, DataLink>,
    /// The interface blocks written so far, by name: their index is the packets' interface_id.
    interfaces: HashMap<Arc<str>, u32>,
}

impl PcapngOut {
    /// Creates FILE (mode 0600) for packets of the capture's link type, but those of the
    /// interfaces in `others`, which have their own. Interface blocks are written as their first
    /// packet is.
    pub fn create(path: &Path, linktype: i32, others: &[(Arc<str>, i32)]) -> anyhow::Result<Self> {
        let file = crate::output::create_private(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let writer = PcapNgWriter::new(BufWriter::new(file))?;
        Ok(Self {
            writer,
            written: HashSet::new(),
            order: VecDeque::new(),
            held: Timeline::default(),
            linktype: DataLink::from(linktype as u32),
            linktypes: others
                .iter()
                .map(|(iface, linktype)| (iface.clone(), DataLink::from(*linktype as u32)))
                .collect(),
            interfaces: HashMap::new(),
        })
    }

    /// The interface_id of `iface`, writing its interface block on first use.
    fn interface_id(&mut self, iface: &Arc<str>) -> anyhow::Result<u32> {
        if let Some(&id) = self.interfaces.get(iface) {
            return Ok(id);
        }
        self.writer.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: self.linktypes.get(iface).copied().unwrap_or(self.linktype),
            snaplen: 0,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Owned(iface.to_string())),
                // Nanosecond timestamps, as captured.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        })?;
        let id = self.interfaces.len() as u32;
        self.interfaces.insert(iface.clone(), id);
        Ok(id)
    }

    /// Takes the packet with its comment, unless it was taken already; it is written by
    /// `release`, in time order.
    pub fn write(&mut self, pkt: &WirePacket, comment: String) -> anyhow::Result<()> {
        let id = (pkt.src, pkt.dst, pkt.seq, pkt.ack, pkt.flags, pkt.wall_ns);
        if !self.written.insert(id) {
            return Ok(());
        }
        self.order.push_back(id);
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.written.remove(&old);
        }
        let held = (pkt.wall_ns, pkt.iface.clone(), pkt.headers.clone(), comment);
        self.held.hold(pkt.mono_ns, held);
        Ok(())
    }

    /// Writes, in capture order, the packets captured before `until_mono_ns` (all of them with
    /// u64::MAX).
    pub fn release(&mut self, until_mono_ns: u64) -> anyhow::Result<()> {
        // One at a time: the interface block may have to be written first.
        loop {
            let next = self.held.release(until_mono_ns).next();
            let Some((wall_ns, iface, headers, comment)) = next else {
                break;
            };
            let interface_id = self.interface_id(&iface)?;
            self.writer.write_pcapng_block(EnhancedPacketBlock {
                interface_id,
                timestamp: Duration::from_nanos(wall_ns),
                original_len: headers.len() as u32,
                data: Cow::Borrowed(&headers),
                options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment))],
            })?;
        }
        Ok(())
    }

    /// Writes every packet still held and flushes the file.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        self.release(u64::MAX)?;
        self.writer.get_mut().flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Dir;

    fn packet(mono_ns: u64, seq: u32) -> WirePacket {
        packet_on(mono_ns, seq, "lo")
    }

    fn packet_on(mono_ns: u64, seq: u32, iface: &str) -> WirePacket {
        WirePacket {
            mono_ns,
            wall_ns: mono_ns + 1_000_000_000_000,
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            flags: crate::capture::tcp_flags::FIN,
            seq,
            data_end: seq,
            ack: 1,
            iface: Arc::from(iface),
            dir: Dir::Out,
            headers: Arc::from(&[0u8; 40][..]),
            only_copy: true,
            on_loopback: iface == "lo",
        }
    }

    /// Packets come from the joiner out of capture order (each when its event leaves); the
    /// file has them in capture order, each once.
    #[test]
    fn packets_are_written_in_capture_order() {
        let path = std::env::temp_dir().join(format!("tracer-order-{}.pcapng", std::process::id()));
        let mut out = PcapngOut::create(&path, 276, &[]).unwrap();
        for (mono, seq) in [(30, 3), (10, 1), (30, 3), (20, 2)] {
            out.write(&packet(mono, seq), format!("seq {seq}")).unwrap();
        }
        out.release(25).unwrap();
        out.write(&packet(40, 4), "seq 4".into()).unwrap();
        out.flush().unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(file).unwrap();
        let mut times = Vec::new();
        while let Some(block) = reader.next_block() {
            if let pcap_file::pcapng::Block::EnhancedPacket(p) = block.unwrap() {
                times.push(p.timestamp.as_nanos() as u64 - 1_000_000_000_000);
            }
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(times, [10, 20, 30, 40]);
    }

    /// With `-i any` packets cross several interfaces: each has a named interface block, and
    /// each packet points at its own.
    #[test]
    fn each_packet_names_the_interface_it_was_seen_on() {
        let path =
            std::env::temp_dir().join(format!("tracer-ifaces-{}.pcapng", std::process::id()));
        let mut out = PcapngOut::create(&path, 276, &[]).unwrap();
        for (mono, iface) in [(10, "veth1"), (20, "lo"), (30, "veth1")] {
            out.write(&packet_on(mono, mono as u32, iface), String::new())
                .unwrap();
        }
        out.flush().unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(file).unwrap();
        let (mut names, mut ids) = (Vec::new(), Vec::new());
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                pcap_file::pcapng::Block::InterfaceDescription(idb) => {
                    for option in idb.options {
                        if let InterfaceDescriptionOption::IfName(name) = option {
                            names.push(name.to_string());
                        }
                    }
                }
                pcap_file::pcapng::Block::EnhancedPacket(p) => ids.push(p.interface_id),
                _ => {}
            }
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(names, ["veth1", "lo"]);
        assert_eq!(ids, [0, 1, 0]);
    }
}
