import Crypto
import NIOCore

/// One UDP subflow's transport, without I/O: the session's frames in, datagrams out, and back.
/// It gives the session engine what a TCP connection gives it, with one difference the session
/// layer wants: lost DATA is not resent by the subflow but handed back (`dataLost`), so the
/// session can send it again on whichever subflow its scheduler picks.
///
/// - Control frames (handshake, signals, CLOSE, ABORT) and the shutdown are delivered once each and
///   in order: each has a control sequence number; a datagram whose first control frame is beyond
///   the next expected one is dropped unacknowledged, so the sender resends it (go-back-N, for
///   frames that are rare and small).
/// - DATA, DATA_ACK, DATA_FIN and probes are delivered as they come; the session orders data by
///   its sequence numbers and drops duplicates.
/// - Packet numbers are never reused; ACK items report ranges, so a loss is found three packets
///   or 9/8 of an RTT later (RFC 9002), and a probe timeout finds a lost tail.
/// - Datagrams are authenticated once the keys are installed; before that only handshake frames
///   travel, and once an authenticated datagram has arrived nothing unauthenticated is accepted.
public struct DatagramConnection {
    public enum Event: Sendable, Equatable {
        case frame(Frame)
        /// A DATA frame was lost: the session should send those bytes again.
        case dataLost(sequence: UInt64, length: Int)
        /// The peer will send no more frames on this subflow.
        case peerShutdown
        case peerReset
        case pathChallenge(UInt64)
        case pathResponse(UInt64)
        /// An authenticated datagram that cannot be parsed: the peer is broken.
        case malformed(String)
        /// A probe of this size was acknowledged: DATA may fill datagrams of it (`maxDataPayload`).
        case datagramSizeConfirmed(Int)
    }

    public enum Drop: Sendable, Equatable {
        case unauthenticated, replayed, unprotectedAfterKeys, outOfOrderControl, notYetDecryptable, forbiddenUnprotected, wrongConnection
    }

    public struct Statistics: Sendable, Equatable {
        public var datagramsSent = 0
        public var datagramsReceived = 0
        public var bytesSent = 0
        public var lostPackets = 0
        public var retransmittedControlFrames = 0
        public var dropped: [Drop: Int] = [:]
    }

    private enum ControlItem: Sendable {
        case frame(Frame)
        case shutdown

        var allowedUnprotected: Bool {
            if case .frame(let f) = self { return f.isHandshake || f.type == .abort }
            return false
        }
        /// OPEN, ACCEPT, JOIN and JOIN_ACK give the peer its keys, so they cannot be authenticated
        /// with them; nor can the listener's IDENTITY, which comes just before its ACCEPT.
        func travelsUnprotected(sentByOpener: Bool) -> Bool {
            guard case .frame(let f) = self else { return false }
            switch f {
            case .open, .accept, .join, .joinAck: return true
            case .identity: return !sentByOpener
            default: return false
            }
        }
        var encodedLength: Int {
            switch self {
            case .frame(let f): f.encodedLength
            case .shutdown: 3
            }
        }
    }

    struct SentPacket: Sendable {
        var number: UInt64
        var sentAt: UInt64
        var size: Int
        var ackEliciting: Bool
        var countsInFlight: Bool
        var isProtected: Bool
        var data: (sequence: UInt64, length: Int)?
        var control: Range<UInt32>?
        var dataAck: Frame.DataAck?
        var dataFin: Frame.DataFin?
    }

    public let connectionID: UInt64
    public let isOpener: Bool
    public let maxAckDelay: UInt64 = 10_000_000
    /// RFC 9002's PTO, before backoff: what a packet or a path MTU probe is given to be acknowledged.
    private var probeTimeout: UInt64 { rtt.probeTimeout(maxAckDelay: maxAckDelay) }
    public private(set) var rtt = RTTEstimator()
    public private(set) var congestion = NewReno()
    public private(set) var statistics = Statistics()
    public private(set) var pathMTU = PathMTUSearch()
    private var lostPacketsAtProbe = 0
    /// Packets of ours were lost since the probe in flight went out: its loss proves less.
    private var lostSinceProbe: Bool { statistics.lostPackets > lostPacketsAtProbe }
    /// The size of the datagrams this end sends: the base until a larger one is confirmed.
    public var maxDatagramSize: Int { pathMTU.confirmed }
    /// The largest DATA payload a datagram carries now.
    public var maxDataPayload: Int { DatagramWire.maxDataPayload(datagramSize: maxDatagramSize) }

    private var sendKey: SymmetricKey?
    private var receiveKey: SymmetricKey?
    public private(set) var receivedProtected = false
    /// Authenticated datagrams that came before the keys (the listener's first data can overtake
    /// the hand-over of the ACCEPT to the session); tried again when the keys arrive.
    private var early: [ByteBuffer] = []
    private static let maxEarlyDatagrams = 16

    // Sender.
    private var nextPacketNumber: UInt64 = 0
    private var sent = SentPackets<SentPacket>()
    private var nextControlSequence: UInt32 = 0
    private var controlItems: [UInt32: ControlItem] = [:]
    /// Control sequence numbers to send or send again, ascending.
    private var controlQueue: [UInt32] = []
    private var unordered = CircularBuffer<Frame>()
    private var dataQueue = CircularBuffer<(sequence: UInt64, payload: ByteBuffer)>()
    public private(set) var queuedDataBytes = 0
    private var itemQueue: [DatagramItem] = []
    private var latestDataAck: Frame.DataAck?
    private var finAwaitingAck: Frame.DataFin?
    private var largestAcked: UInt64?
    private var lossTime: UInt64?
    public private(set) var probeTimeouts = 0
    public private(set) var lastAckElicitingSentAt: UInt64?
    public private(set) var lastAckReceivedAt: UInt64?
    private var shutdownSequence: UInt32?
    public private(set) var shutdownAcknowledged = false

    // Receiver.
    private var received = ReceivedPackets()
    private var deliveredControl: UInt32 = 0
    private var ackElicitingSinceAck = 0
    private var ackDeadline: UInt64?
    private var ackNow = false
    private var largestReceivedAt: UInt64 = 0
    public private(set) var lastReceiveAt: UInt64?

    public init(connectionID: UInt64, isOpener: Bool) {
        self.connectionID = connectionID
        self.isOpener = isOpener
    }

    // MARK: keys

    public var hasKeys: Bool { sendKey != nil }

    /// From here on every datagram sent is authenticated (except those that carry handshake
    /// frames, which the peer may not be able to check yet), and every one received must be.
    public mutating func installKeys(send: SymmetricKey, receive: SymmetricKey, now: UInt64) -> [Event] {
        sendKey = send
        receiveKey = receive
        var events: [Event] = []
        let held = early
        early = []
        for datagram in held { events += self.receive(datagram, now: now).events }
        return events
    }

    // MARK: what the session sends

    public mutating func queue(_ frame: Frame) {
        switch frame {
        case .data(let data):
            queueData(sequence: data.sequence, payload: data.payload)
        case .dataAck(let ack):
            // Only the newest acknowledgement matters.
            unordered.removeAll { if case .dataAck = $0 { true } else { false } }
            unordered.append(.dataAck(ack))
        case .dataFin, .probe, .probeAck:
            unordered.append(frame)
        default:
            queueControl(.frame(frame))
        }
    }

    public mutating func queueData(sequence: UInt64, payload: ByteBuffer) {
        dataQueue.append((sequence, payload))
        queuedDataBytes += payload.readableBytes
    }

    /// No more frames from this end: the peer learns it after every control frame sent before.
    public mutating func queueShutdown() {
        guard shutdownSequence == nil else { return }
        shutdownSequence = nextControlSequence
        queueControl(.shutdown)
    }

    public mutating func queuePing() { itemQueue.append(.ping) }

    /// Sizes to probe for (`PathMTUSearch.candidates`); probes start once the peer has shown it
    /// holds the keys.
    public mutating func probeDatagramSizes(_ sizes: [Int]) { pathMTU.consider(sizes) }

    private mutating func queueControl(_ item: ControlItem) {
        let sequence = nextControlSequence
        nextControlSequence += 1
        controlItems[sequence] = item
        controlQueue.append(sequence)
    }

    /// True when the window has room beyond what is already queued: the engine's writability.
    public var isWritable: Bool { congestion.bytesInFlight + queuedDataBytes < congestion.window }

    public var hasAckElicitingInFlight: Bool { !sent.isEmpty }
    /// Since when the peer owes us an acknowledgement: the later of its last ACK and the sending of
    /// the oldest packet it has not acknowledged. An idle subflow's last ACK may be long past; a probe
    /// sent now is not overdue by that much.
    public var silentSince: UInt64? {
        switch (lastAckReceivedAt, sent.oldest?.sentAt) {
        case let (ack?, oldest?): max(ack, oldest)
        case let (ack, oldest): ack ?? oldest
        }
    }
    public var bytesInFlight: Int { congestion.bytesInFlight }
    /// The peer has owed an acknowledgement (`silentSince`) for longer than a probe timeout: what
    /// `probeTimeouts` would count had later packets not pushed its timer on, as each ack-eliciting
    /// packet sent does (RFC 9002 §6.2.1). A session's PROBE rounds, once a second, did so on dead
    /// subflows whose RTT under load had reached seconds, and the listener held them as live for a
    /// minute (the debug UDP soak, seed 31337).
    public func acknowledgementOverdue(now: UInt64) -> Bool {
        guard hasAckElicitingInFlight, let since = silentSince, now > since else { return false }
        return now - since > probeTimeout
    }

    // MARK: building datagrams

    public enum SendDecision: Sendable {
        case datagram(ByteBuffer)
        /// The pacer holds the next datagram until then.
        case wait(until: UInt64)
        case nothing
    }

    private var hasSendableControl: Bool {
        guard let head = controlQueue.first, let item = controlItems[head] else { return false }
        return hasKeys || item.allowedUnprotected
    }

    private var hasWindowedWork: Bool {
        hasSendableControl || (hasKeys && (!unordered.isEmpty || !dataQueue.isEmpty))
    }

    /// The next datagram to send now, if any.
    public mutating func nextDatagram(now: UInt64, allocator: ByteBufferAllocator = .init()) -> SendDecision {
        controlQueue.removeAll { controlItems[$0] == nil }
        if receivedProtected, let size = pathMTU.sizeToProbe, congestion.bytesInFlight + size <= congestion.window {
            return .datagram(buildProbe(size: size, now: now, allocator: allocator))
        }
        let urgentItems = !itemQueue.isEmpty
        if hasWindowedWork {
            let windowOpen = congestion.bytesInFlight < congestion.window
            if windowOpen {
                let when = congestion.sendTime(bytes: maxDatagramSize, now: now, rtt: rtt)
                if when <= now { return .datagram(build(now: now, allocator: allocator, includeWindowed: true)) }
                if !ackNow && !urgentItems { return .wait(until: when) }
            }
        }
        if ackNow || urgentItems {
            return .datagram(build(now: now, allocator: allocator, includeWindowed: false))
        }
        return .nothing
    }

    /// A PING padded to `size`, authenticated. Not tracked with the others: its loss is no loss of
    /// anything the subflow carries, and must not slow it or make it look dead.
    private mutating func buildProbe(size: Int, now: UInt64, allocator: ByteBufferAllocator) -> ByteBuffer {
        let fill = size - DatagramWire.headerLength - DatagramWire.tagLength - DatagramItem.ping.encodedLength - DatagramItem.padding(0).encodedLength
        let packet = DatagramPacket(isProtected: true, connectionID: connectionID, packetNumber: nextPacketNumber,
                                    controlBase: nextControlSequence, items: [.ping, .padding(fill)], frames: [])
        let datagram = packet.encode(key: sendKey, allocator: allocator)
        pathMTU.sent(number: nextPacketNumber, size: datagram.readableBytes, at: now)
        lostPacketsAtProbe = statistics.lostPackets
        nextPacketNumber += 1
        statistics.datagramsSent += 1
        statistics.bytesSent += datagram.readableBytes
        return datagram
    }

    private mutating func build(now: UInt64, allocator: ByteBufferAllocator, includeWindowed: Bool) -> ByteBuffer {
        let size = maxDatagramSize
        var budget = size - DatagramWire.headerLength
        var items: [DatagramItem] = []
        var frames: [Frame] = []
        var record = SentPacket(number: nextPacketNumber, sentAt: now, size: 0, ackEliciting: false, countsInFlight: false, isProtected: false)

        // Handshake frames travel alone, unprotected; everything else waits for the keys.
        let headItem = controlQueue.first.flatMap { controlItems[$0] }
        let unprotected = sendKey == nil || (includeWindowed && headItem?.travelsUnprotected(sentByOpener: isOpener) == true)
        if !unprotected { budget -= DatagramWire.tagLength }
        record.isProtected = !unprotected

        if let ack = makeAck(room: budget - 3 - 4 - 1, now: now) {
            items.append(ack)
            budget -= ack.encodedLength
            ackNow = false
            ackDeadline = nil
            ackElicitingSinceAck = 0
        }
        while let item = itemQueue.first, item.encodedLength <= budget {
            if unprotected, item != .ping { break }
            itemQueue.removeFirst()
            items.append(item)
            budget -= item.encodedLength
            record.ackEliciting = true
        }
        var controlBase = nextControlSequence
        var carriesHello = false
        if includeWindowed {
            var taken: [UInt32] = []
            var expected: UInt32?
            for sequence in controlQueue {
                guard let item = controlItems[sequence], expected == nil || sequence == expected else { break }
                if unprotected, !item.allowedUnprotected { break }
                if !unprotected, item.travelsUnprotected(sentByOpener: isOpener) { break }
                let length = item.encodedLength
                guard length <= budget || taken.isEmpty else { break }
                taken.append(sequence)
                budget -= length
                expected = sequence + 1
                switch item {
                case .frame(let frame):
                    frames.append(frame)
                    if case .open = frame { carriesHello = true }
                    if case .join = frame { carriesHello = true }
                case .shutdown:
                    items.append(.shutdown)
                }
            }
            if let first = taken.first {
                controlBase = first
                record.control = first..<(first + UInt32(taken.count))
                controlQueue.removeFirst(taken.count)
                record.ackEliciting = true
            }
            if !unprotected {
                while let frame = unordered.first {
                    let size = frame.encodedLength
                    guard size <= budget else { break }
                    unordered.removeFirst()
                    frames.append(frame)
                    budget -= size
                    record.ackEliciting = true
                    if case .dataAck(let ack) = frame { record.dataAck = ack; latestDataAck = ack }
                    if case .dataFin(let fin) = frame { record.dataFin = fin; finAwaitingAck = fin }
                }
                if let first = dataQueue.first, NBSWire.frameHeaderLength + 8 + first.payload.readableBytes <= budget {
                    dataQueue.removeFirst()
                    queuedDataBytes -= first.payload.readableBytes
                    frames.append(.data(.init(sequence: first.sequence, payload: first.payload)))
                    budget -= NBSWire.frameHeaderLength + 8 + first.payload.readableBytes
                    record.data = (first.sequence, first.payload.readableBytes)
                    record.ackEliciting = true
                }
            }
        }
        if carriesHello {
            let used = size - DatagramWire.headerLength - budget
            let fill = DatagramWire.minimumHelloSize - DatagramWire.headerLength - used - 3
            if fill >= 0 { items.append(.padding(fill)) }
        }
        let packet = DatagramPacket(isProtected: !unprotected, connectionID: connectionID, packetNumber: nextPacketNumber,
                                    controlBase: controlBase, items: items, frames: frames)
        let datagram = packet.encode(key: unprotected ? nil : sendKey, allocator: allocator)
        nextPacketNumber += 1
        record.size = datagram.readableBytes
        record.countsInFlight = record.ackEliciting
        // Only what must be acknowledged is tracked: nothing is resent for a lost bare ACK.
        if record.ackEliciting {
            lastAckElicitingSentAt = now
            congestion.sent(bytes: record.size, now: now, rtt: rtt)
            sent.append(record, number: record.number)
        }
        statistics.datagramsSent += 1
        statistics.bytesSent += record.size
        return datagram
    }

    private func makeAck(room: Int, now: UInt64) -> DatagramItem? {
        guard ackNow || ackDeadline != nil, !received.ranges.isEmpty, room >= 16 else { return nil }
        let count = min(received.ranges.count, room / 16)
        let delay = UInt32(clamping: (now > largestReceivedAt ? now - largestReceivedAt : 0) / 1000)
        return .ack(ranges: Array(received.ranges.prefix(count)), delayMicros: delay)
    }

    /// A datagram with one path-check item, sent on a path that may not be the subflow's own.
    /// Not counted against the window: it is one small datagram per check.
    public mutating func pathDatagram(_ item: DatagramItem, now: UInt64, allocator: ByteBufferAllocator = .init()) -> ByteBuffer? {
        guard let sendKey else { return nil }
        let packet = DatagramPacket(isProtected: true, connectionID: connectionID, packetNumber: nextPacketNumber,
                                    controlBase: nextControlSequence, items: [item], frames: [])
        nextPacketNumber += 1
        return packet.encode(key: sendKey, allocator: allocator)
    }

    // MARK: receiving

    public struct Received: Sendable {
        public var events: [Event] = []
        public var dropped: Drop?
        /// Authenticated and new: its source address is one the peer really sent from.
        public var authenticated = false
        /// The largest packet number so far: a change of address here is the peer's, not a stray.
        public var isNewest = false
    }

    /// Interprets one datagram. Throws for a datagram that authenticates but cannot be parsed:
    /// the peer is broken, and the subflow should close with the reason.
    public mutating func receive(_ datagram: ByteBuffer, now: UInt64) -> Received {
        var result = Received()
        guard let form: UInt8 = datagram.getInteger(at: datagram.readerIndex) else { return drop(.unauthenticated) }
        var body = datagram
        if form == DatagramWire.protectedForm {
            guard let key = receiveKey else {
                if early.count < Self.maxEarlyDatagrams, isOpener { early.append(datagram) }
                return drop(.notYetDecryptable)
            }
            guard let checked = DatagramPacket.authenticate(datagram, key: key) else { return drop(.unauthenticated) }
            body = checked
        } else if receivedProtected {
            return drop(.unprotectedAfterKeys)
        }
        let packet: DatagramPacket
        do {
            packet = try DatagramPacket.decode(body)
        } catch {
            // Unauthenticated garbage harms nothing; from an authenticated peer it is a fault.
            if form == DatagramWire.protectedForm { result.events = [.malformed("\(error)")] }
            return drop(.unauthenticated, keeping: result)
        }
        guard packet.connectionID == connectionID else { return drop(.wrongConnection) }
        if !packet.isProtected {
            let allowed = packet.items.allSatisfy { if case .ack = $0 { true } else { $0 == .ping || $0.isPadding } }
                && packet.frames.allSatisfy { $0.isHandshake || $0.type == .abort }
            guard allowed else { return drop(.forbiddenUnprotected) }
        }
        guard !received.contains(packet.packetNumber) else { return drop(.replayed) }
        let ordered = packet.frames.filter(\.isOrderedOnDatagrams).count + (packet.items.contains(.shutdown) ? 1 : 0)
        if ordered > 0, packet.controlBase > deliveredControl {
            ackNow = true  // the gap says something was lost: tell the sender at once
            return drop(.outOfOrderControl)
        }

        let previousLargest = received.largest
        _ = received.insert(packet.packetNumber)
        statistics.datagramsReceived += 1
        lastReceiveAt = now
        result.authenticated = packet.isProtected
        // The peer's probe of this size came through: the way back likely carries ours. (A
        // listener has no route MTU of its own to start from: its socket is not connected.)
        // Only a probe's size (a PING padded out) is a size the peer chose to test.
        if packet.isProtected, datagram.readableBytes > pathMTU.confirmed, packet.frames.isEmpty,
           packet.items.contains(where: \.isPadding) {
            pathMTU.consider([datagram.readableBytes])
        }
        result.isNewest = previousLargest.map { packet.packetNumber > $0 } ?? true
        if result.isNewest { largestReceivedAt = now }
        if packet.isProtected, !receivedProtected {
            receivedProtected = true
            // The peer authenticates only once it holds the keys, which it got from our
            // handshake frames: those are acknowledged, whatever became of the ACKs.
            discardUnprotectedPackets()
        }

        let ackEliciting = !packet.frames.isEmpty || packet.items.contains { item in
            switch item {
            case .ack, .padding: false
            default: true
            }
        }
        if ackEliciting {
            ackElicitingSinceAck += 1
            if let previousLargest, packet.packetNumber != previousLargest + 1 { ackNow = true }
            // A DATA_ACK waits as DATA does: a bulk sender's window is mostly full when one comes,
            // so an ACK at once went alone, 5,100 datagrams per 16 MiB sent over 10+10 Mbit/s (3 %
            // of the wire); delayed, it rides the next DATA datagram.
            if ackElicitingSinceAck >= 2 || packet.frames.contains(where: { !$0.isOrderedOnDatagrams && $0.type != .data && $0.type != .dataAck }) || ordered > 0 {
                ackNow = true
            } else if ackDeadline == nil {
                ackDeadline = now + maxAckDelay
            }
        }

        var events: [Event] = []
        for item in packet.items {
            switch item {
            case .ack(let ranges, let delay):
                events += processAck(ranges, delayMicros: delay, now: now)
            case .pathChallenge(let v):
                events.append(.pathChallenge(v))
            case .pathResponse(let v):
                events.append(.pathResponse(v))
            case .reset:
                events.append(.peerReset)
            case .ping, .padding, .shutdown:
                break
            }
        }
        var sequence = packet.controlBase
        for frame in packet.frames {
            if frame.isOrderedOnDatagrams {
                defer { sequence += 1 }
                guard sequence >= deliveredControl else { continue }  // delivered before
                deliveredControl = sequence + 1
            }
            events.append(.frame(frame))
        }
        if packet.items.contains(.shutdown), sequence >= deliveredControl {
            deliveredControl = sequence + 1
            events.append(.peerShutdown)
        }
        result.events = events
        return result
    }

    private mutating func drop(_ reason: Drop, keeping result: Received = .init()) -> Received {
        statistics.dropped[reason, default: 0] += 1
        var result = result
        result.dropped = reason
        return result
    }

    private mutating func discardUnprotectedPackets() {
        for packet in sent.removeAll(where: { !$0.isProtected }) {
            if packet.countsInFlight { congestion.discarded(bytes: packet.size) }
            if let control = packet.control { for s in control { controlItems[s] = nil } }
        }
        controlQueue.removeAll { controlItems[$0] == nil }
    }

    private mutating func processAck(_ ranges: [ClosedRange<UInt64>], delayMicros: UInt32, now: UInt64) -> [Event] {
        guard let newest = ranges.first?.upperBound, newest < nextPacketNumber else { return [] }
        lastAckReceivedAt = now
        var newlyAckedLargest: SentPacket?
        for range in ranges {
            for packet in sent.remove(range) {
                if packet.countsInFlight { congestion.acknowledged(bytes: packet.size, sentAt: packet.sentAt) }
                if let control = packet.control {
                    for s in control {
                        if s == shutdownSequence { shutdownAcknowledged = true }
                        controlItems[s] = nil
                    }
                }
                if let fin = packet.dataFin, fin == finAwaitingAck { finAwaitingAck = nil }
                if newlyAckedLargest.map({ packet.number > $0.number }) ?? true { newlyAckedLargest = packet }
            }
        }
        var events: [Event] = []
        if let largestPacket = newlyAckedLargest {
            largestAcked = max(largestAcked ?? 0, newest)
            if largestPacket.number == newest, largestPacket.ackEliciting, now > largestPacket.sentAt {
                rtt.add(sample: now - largestPacket.sentAt, ackDelay: UInt64(delayMicros) * 1000)
            }
            probeTimeouts = 0
            events = detectLosses(now: now)
        }
        // After the losses this ACK reveals, which say whether a lost probe proves anything.
        if let size = pathMTU.acknowledged(ranges, congested: lostSinceProbe) {
            congestion.maxDatagramSize = size
            events.append(.datagramSizeConfirmed(size))
        }
        return events
    }

    private mutating func detectLosses(now: UInt64) -> [Event] {
        guard let largestAcked else { return [] }
        lossTime = nil
        let delay = rtt.lossDelay
        var events: [Event] = []
        for packet in sent.packets(below: largestAcked) {
            if packet.number + 3 <= largestAcked || packet.sentAt + delay <= now {
                sent.remove(packet.number...packet.number)
                events += declareLost(packet, now: now)
            } else {
                lossTime = min(lossTime ?? .max, packet.sentAt + delay)
            }
        }
        return events
    }

    private mutating func declareLost(_ packet: SentPacket, now: UInt64) -> [Event] {
        statistics.lostPackets += 1
        if packet.countsInFlight { congestion.lost(bytes: packet.size, sentAt: packet.sentAt, now: now) }
        var events: [Event] = []
        if let data = packet.data { events.append(.dataLost(sequence: data.sequence, length: data.length)) }
        if let control = packet.control {
            let again = control.filter { controlItems[$0] != nil }
            statistics.retransmittedControlFrames += again.count
            controlQueue = Array(Set(controlQueue).union(again)).sorted()
        }
        if let fin = packet.dataFin, fin == finAwaitingAck, !unordered.contains(.dataFin(fin)) { unordered.append(.dataFin(fin)) }
        if let ack = packet.dataAck, ack == latestDataAck, !unordered.contains(where: { $0.type == .dataAck }) { unordered.append(.dataAck(ack)) }
        return events
    }

    // MARK: timers

    private var probeDeadline: UInt64? {
        guard let last = lastAckElicitingSentAt, hasAckElicitingInFlight else { return nil }
        return last + probeTimeout << min(probeTimeouts, 6)
    }

    /// When `timeout(now:)` must next run.
    public var nextTimeout: UInt64? {
        [ackDeadline, lossTime, probeDeadline, pathMTU.deadline(probeTimeout: probeTimeout)].compactMap { $0 }.min()
    }

    public mutating func timeout(now: UInt64) -> [Event] {
        var events: [Event] = []
        pathMTU.expire(now: now, probeTimeout: probeTimeout, congested: lostSinceProbe)
        if let deadline = ackDeadline, deadline <= now { ackNow = true }
        if let lossTime, lossTime <= now {
            events += detectLosses(now: now)
        } else if let probe = probeDeadline, probe <= now {
            // Nothing acknowledged for a probe timeout: a PING makes the peer say what it has, and
            // lost data is found from its answer. Control frames in flight go again with it: a lost
            // OPEN, JOIN or ACCEPT has no later datagram whose acknowledgement could reveal it (the
            // peer drops what it cannot place), and the receiver keeps each control frame once.
            probeTimeouts += 1
            lastAckElicitingSentAt = now
            itemQueue.append(.ping)
            let unacknowledged = sent.packets(below: .max).flatMap { $0.control.map(Array.init) ?? [] }.filter { controlItems[$0] != nil }
            if !unacknowledged.isEmpty {
                statistics.retransmittedControlFrames += unacknowledged.count
                controlQueue = Array(Set(controlQueue).union(unacknowledged)).sorted()
            }
            if probeTimeouts == 3 { congestion.collapse() }
        }
        return events
    }
}

extension Frame {
    /// Bytes of the frame with its header, as FrameEncoder writes them. Only for the small
    /// non-DATA frames (DATA is measured from its payload): it encodes the frame to count.
    var encodedLength: Int {
        var buffer = ByteBuffer()
        FrameEncoder.encode(self, into: &buffer)
        return buffer.readableBytes
    }
}
