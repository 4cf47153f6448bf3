//! `-w FILE.pcapng`: the captured FIN/RST packets (headers only) with a comment on each naming
//! the process and the event it joined, so Wireshark and tshark show who sent it. libpcap cannot
//! write packet comments; the pcap-file crate writes pcapng.

use std::{
    borrow::Cow,
    collections::{HashSet, VecDeque},
    fs::File,
    io::BufWriter,
    path::Path,
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

use crate::capture::WirePacket;

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

pub struct PcapngOut {
    writer: PcapNgWriter<BufWriter<File>>,
    written: HashSet<PacketId>,
    order: VecDeque<PacketId>,
}

impl PcapngOut {
    /// Creates FILE (mode 0600) with one interface of the capture's link type.
    pub fn create(path: &Path, linktype: i32) -> anyhow::Result<Self> {
        let file = crate::output::create_private(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut writer = PcapNgWriter::new(BufWriter::new(file))?;
        writer.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: DataLink::from(linktype as u32),
            snaplen: 0,
            // Nanosecond timestamps, as captured.
            options: vec![InterfaceDescriptionOption::IfTsResol(9)],
        })?;
        Ok(Self {
            writer,
            written: HashSet::new(),
            order: VecDeque::new(),
        })
    }

    /// Writes the packet with its comment, unless it was written already.
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
        self.writer.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_nanos(pkt.wall_ns),
            original_len: pkt.headers.len() as u32,
            data: Cow::Borrowed(&pkt.headers),
            options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment))],
        })?;
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        self.writer.get_mut().flush()?;
        Ok(())
    }
}
