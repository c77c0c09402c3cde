@preconcurrency import Crypto
import NIOCore
import Testing

@testable import NBSProtocol

/// The UDP subflow transport, without sockets: the datagram format, its authentication, loss
/// recovery and congestion control, driven on a simulated path with a virtual clock.
@Suite struct DatagramTests {
    nonisolated(unsafe) static let openerKey = SymmetricKey(data: [UInt8](repeating: 1, count: 32))
    nonisolated(unsafe) static let listenerKey = SymmetricKey(data: [UInt8](repeating: 2, count: 32))

    static func keyedPair() -> (DatagramConnection, DatagramConnection) {
        var opener = DatagramConnection(connectionID: 42, isOpener: true)
        var listener = DatagramConnection(connectionID: 42, isOpener: false)
        _ = opener.installKeys(send: openerKey, receive: listenerKey, now: 0)
        _ = listener.installKeys(send: listenerKey, receive: openerKey, now: 0)
        return (opener, listener)
    }

    static func drain(_ c: inout DatagramConnection, now: UInt64) -> [ByteBuffer] {
        var out: [ByteBuffer] = []
        while case .datagram(let d) = c.nextDatagram(now: now) { out.append(d) }
        return out
    }

    @Test func formatRoundTripsAndTheTagCoversEveryByte() throws {
        let packet = DatagramPacket(isProtected: true, connectionID: 7, packetNumber: 99, controlBase: 3,
                                    items: [.ack(ranges: [10...12, 4...8], delayMicros: 250), .ping, .pathChallenge(5)],
                                    frames: [.dataAck(.init(cumulativeAck: 1000, window: 65536)), .data(.init(sequence: 5, payload: ByteBuffer(bytes: [1, 2, 3])))])
        let wire = packet.encode(key: Self.openerKey)
        let body = try #require(DatagramPacket.authenticate(wire, key: Self.openerKey))
        #expect(try DatagramPacket.decode(body) == packet)
        #expect(DatagramPacket.peekConnectionID(wire) == 7)
        #expect(DatagramPacket.authenticate(wire, key: Self.listenerKey) == nil)
        for i in 0..<wire.readableBytes {
            var flipped = wire
            flipped.setInteger(wire.getInteger(at: i, as: UInt8.self)! ^ 0x01, at: i)
            #expect(DatagramPacket.authenticate(flipped, key: Self.openerKey) == nil, "a flipped bit at \(i) passed")
        }
    }

    @Test func garbageNeverCrashesTheParser() {
        var rng = SplitMix64(seed: 9)
        for _ in 0..<5000 {
            var bytes = patternBytes(Int.random(in: 0...1400, using: &rng), seed: rng.next())
            if !bytes.isEmpty, rng.chance(0.5) { bytes[0] = DatagramWire.unprotectedForm }
            _ = try? DatagramPacket.decode(ByteBuffer(bytes: bytes))
            var c = DatagramConnection(connectionID: 1, isOpener: false)
            _ = c.receive(ByteBuffer(bytes: bytes), now: 0)
        }
    }

    @Test func receivedPacketsMergeRefuseRepeatsAndStayBounded() {
        var r = ReceivedPackets(maxRanges: 4)
        for pn: UInt64 in [0, 1, 2, 5, 4, 9] {
            let inserted = r.insert(pn)
            #expect(inserted)
        }
        #expect(r.ranges == [9...9, 4...5, 0...2])
        let repeated = r.insert(4)
        #expect(!repeated)
        let three = r.insert(3)
        #expect(three)
        #expect(r.ranges == [9...9, 0...5])
        for pn: UInt64 in [11, 13, 15, 17] { _ = r.insert(pn) }
        #expect(r.ranges.count == 4)
        #expect(r.contains(2), "forgotten numbers count as seen: a replay cannot slip in below the floor")
        let forgotten = r.insert(7)
        #expect(!forgotten)
    }

    @Test func newRenoGrowsHalvesOncePerLossEventAndPaces() {
        var cc = NewReno()
        var rtt = RTTEstimator()
        rtt.add(sample: 20_000_000, ackDelay: 0)
        let start = cc.window
        cc.sent(bytes: 1200, now: 0, rtt: rtt)
        cc.acknowledged(bytes: 1200, sentAt: 0)
        #expect(cc.window == start + 1200, "slow start adds what was acknowledged")
        for i in 0..<4 { cc.sent(bytes: 1200, now: UInt64(i), rtt: rtt) }
        cc.lost(bytes: 1200, sentAt: 1, now: 10)
        let halved = cc.window
        #expect(halved == (start + 1200) / 2)
        cc.lost(bytes: 1200, sentAt: 2, now: 11)
        #expect(cc.window == halved, "losses of one round trip count once")
        cc.acknowledged(bytes: 1200, sentAt: 12)
        #expect(cc.window > halved && cc.window < halved + 1200, "congestion avoidance grows by about a datagram per window")
        #expect(abs(cc.pacingRate(rtt: rtt) - 1.25 * Double(cc.window) / 0.020) < 1)
    }

    @Test func unauthenticatedReplayedAndUnprotectedDatagramsAreDroppedBeforeTheyTouchState() throws {
        var (opener, listener) = Self.keyedPair()
        opener.queue(.dataAck(.init(cumulativeAck: 0, window: 100)))
        let datagram = try #require(Self.drain(&opener, now: 1).first)
        #expect(listener.receive(datagram, now: 2).events == [.frame(.dataAck(.init(cumulativeAck: 0, window: 100)))])
        #expect(listener.receive(datagram, now: 3).dropped == .replayed)
        // Forged with the wrong key, and unprotected data once keys are in use.
        let forged = DatagramPacket(isProtected: true, connectionID: 42, packetNumber: 50, controlBase: 0, items: [],
                                    frames: [.data(.init(sequence: 0, payload: ByteBuffer(bytes: [9])))]).encode(key: Self.listenerKey)
        #expect(listener.receive(forged, now: 4).dropped == .unauthenticated)
        let plain = DatagramPacket(isProtected: false, connectionID: 42, packetNumber: 51, controlBase: 0, items: [],
                                   frames: [.data(.init(sequence: 0, payload: ByteBuffer(bytes: [9])))]).encode(key: nil)
        #expect(listener.receive(plain, now: 5).dropped == .unprotectedAfterKeys)
        var fresh = DatagramConnection(connectionID: 42, isOpener: false)
        #expect(fresh.receive(plain, now: 5).dropped == .forbiddenUnprotected, "before the keys, only handshake frames travel unprotected")
        #expect(listener.statistics.dropped[.unauthenticated] == 1)
    }

    @Test func handshakeFramesTravelUnprotectedAndHelloesAreFullSized() throws {
        var opener = DatagramConnection(connectionID: 5, isOpener: true)
        var listener = DatagramConnection(connectionID: 5, isOpener: false)
        let open = Frame.open(.init(sourceName: "a.test", destinationName: "b.test", port: 1, publicKey: .init(repeating: 1, count: 32), nonce: .init(repeating: 2, count: 16)))
        opener.queue(open)
        let hello = try #require(Self.drain(&opener, now: 0).first)
        #expect(hello.readableBytes == DatagramWire.minimumHelloSize)
        #expect(listener.receive(hello, now: 1).events == [.frame(open)])
        // The listener has its keys once it answers; its ACCEPT still goes unprotected, what follows does not.
        _ = listener.installKeys(send: Self.listenerKey, receive: Self.openerKey, now: 1)
        let accept = Frame.accept(.init(serverName: "b.test", token: 1, publicKey: .init(repeating: 3, count: 32), nonce: .init(repeating: 4, count: 16), receiveWindow: 9, mac: .init(repeating: 5, count: 32)))
        listener.queue(accept)
        listener.queue(.dataAck(.init(cumulativeAck: 0, window: 9)))
        let answers = Self.drain(&listener, now: 2)
        #expect(answers.count == 2)
        #expect(answers[0].getInteger(at: 0, as: UInt8.self) == DatagramWire.unprotectedForm)
        #expect(answers[1].getInteger(at: 0, as: UInt8.self) == DatagramWire.protectedForm)
        // The opener cannot check the second before its keys: it holds it, and reads it once it can.
        #expect(opener.receive(answers[1], now: 3).dropped == .notYetDecryptable)
        #expect(opener.receive(answers[0], now: 3).events == [.frame(accept)])
        #expect(opener.installKeys(send: Self.openerKey, receive: Self.listenerKey, now: 4) == [.frame(.dataAck(.init(cumulativeAck: 0, window: 9)))])
    }

    @Test func aLostHelloIsSentAgainAtTheProbeTimeout() throws {
        var opener = DatagramConnection(connectionID: 9, isOpener: true)
        let open = Frame.open(.init(sourceName: "a.test", destinationName: "b.test", port: 1, publicKey: .init(repeating: 1, count: 32), nonce: .init(repeating: 2, count: 16)))
        opener.queue(open)
        #expect(Self.drain(&opener, now: 0).count == 1)  // lost on the way
        let deadline = try #require(opener.nextTimeout)
        _ = opener.timeout(now: deadline)
        let again = Self.drain(&opener, now: deadline)
        var listener = DatagramConnection(connectionID: 9, isOpener: false)
        let carriers = again.filter { listener.receive($0, now: deadline).events.contains(.frame(open)) }
        #expect(carriers.count == 1, "the probe carries the OPEN again")
        #expect(carriers.first?.readableBytes == DatagramWire.minimumHelloSize, "padded again, or a listener would ignore it")
        #expect(opener.probeTimeouts == 1)
    }

    /// Found at 4,000 idle UDP sessions on one host: a probe after a long idle spell counted its wait
    /// from the last ACK, seconds earlier, so one late answer made the session suspend the subflow.
    /// RFC 8899 over a path that carries datagrams of at most `pathLimit` bytes: probes above it go
    /// unanswered (three times each), the largest size that fits is confirmed by the opener and then
    /// by the listener (from the opener's datagrams), DATA fills it, and the lost probes count as
    /// neither congestion nor silence.
    @Test(arguments: [1472, 1450, 1400, 1300])
    func pathMTUSearchConfirmsTheLargestSizeThePathCarries(pathLimit: Int) throws {
        var (opener, listener) = Self.keyedPair()
        let candidates = PathMTUSearch.candidates(linkMTU: 1500, ipv6: false)
        #expect(candidates == [1472, 1400])
        opener.probeDatagramSizes(candidates)
        opener.queue(.dataAck(.init(cumulativeAck: 0, window: 100)))  // something protected first
        var now: UInt64 = 1_000_000
        var confirmed: [Int] = []
        for _ in 0..<300 {
            for d in Self.drain(&opener, now: now) where d.readableBytes <= pathLimit { _ = listener.receive(d, now: now + 1_000_000) }
            now += 12_000_000
            _ = listener.timeout(now: now)
            for d in Self.drain(&listener, now: now) where d.readableBytes <= pathLimit {
                for case .datagramSizeConfirmed(let size) in opener.receive(d, now: now + 1_000_000).events { confirmed.append(size) }
            }
            now += 12_000_000
            _ = opener.timeout(now: now)
        }
        let expected = pathLimit >= 1472 ? 1472 : pathLimit >= 1400 ? 1400 : DatagramWire.baseDatagramSize
        #expect(opener.maxDatagramSize == expected)
        #expect(confirmed == (expected > DatagramWire.baseDatagramSize ? [expected] : []))
        #expect(listener.maxDatagramSize == expected, "the listener probes what the opener's datagrams showed")
        #expect(opener.pathMTU.candidates.isEmpty && !opener.pathMTU.isProbing)
        #expect(opener.congestion.slowStartThreshold == .max, "a lost probe is no congestion signal")
        #expect(opener.probeTimeouts == 0 && !opener.hasAckElicitingInFlight, "nor a sign of a dead path")

        opener.queueData(sequence: 0, payload: ByteBuffer(repeating: 1, count: opener.maxDataPayload))
        let full = Self.drain(&opener, now: now)
        #expect(full.count == 1 && full[0].readableBytes <= expected && full[0].readableBytes > expected - 100)
    }

    @Test func pathMTUCandidatesFollowTheRouteAndStayWithinWhatAReceiverReads() {
        #expect(PathMTUSearch.candidates(linkMTU: 1500, ipv6: true) == [1452, 1400])
        #expect(PathMTUSearch.candidates(linkMTU: 1280, ipv6: true) == [1232])
        #expect(PathMTUSearch.candidates(linkMTU: 1228, ipv6: true) == [])
        var search = PathMTUSearch()
        search.consider(PathMTUSearch.candidates(linkMTU: 65536, ipv6: false) + [DatagramWire.largestDatagramSize])
        #expect(search.candidates == [DatagramWire.largestDatagramSize, 1472, 1400], "65,508 is more than a receiver reads")
        search.sent(number: 7, size: DatagramWire.largestDatagramSize, at: 0)
        #expect(search.sizeToProbe == nil, "one probe at a time")
        #expect(search.acknowledged([8...9]) == nil && search.isProbing, "two later packets are not yet a loss")
        #expect(search.acknowledged([10...10]) == nil && !search.isProbing, "three are")
        search.sent(number: 11, size: 1472, at: 100)
        #expect(search.acknowledged([11...11]) == 1472)
        #expect(search.candidates == [DatagramWire.largestDatagramSize], "what is left to try is larger")

        // Probes lost among the subflow's own losses are excused (up to a bound); others count.
        var at: UInt64 = 1_000
        func probeAndLose(_ search: inout PathMTUSearch, congested: Bool) {
            at += 1_000
            search.sent(number: at, size: DatagramWire.largestDatagramSize, at: at)
            search.expire(now: at + 500, probeTimeout: 100, congested: congested)
        }
        for _ in 0..<PathMTUSearch.excusedLossesPerSize { probeAndLose(&search, congested: true) }
        for _ in 0..<(PathMTUSearch.probesPerSize - 1) { probeAndLose(&search, congested: false) }
        #expect(search.sizeToProbe == DatagramWire.largestDatagramSize)
        probeAndLose(&search, congested: true)
        #expect(search.sizeToProbe == nil && search.confirmed == 1472, "excuses run out: the size is given up")
        #expect(search.acknowledged([at...at]) == DatagramWire.largestDatagramSize, "unless its ACK comes after all, late")
    }

    /// A bulk sender's window is mostly full when the receiver's DATA_ACK arrives: an ACK sent at
    /// once went alone (5,100 small datagrams per 16 MiB over 10+10 Mbit/s, 3 % of the wire). It
    /// waits as for DATA now, and rides the sender's next DATA datagram.
    @Test func anAckOfADataAckRidesTheNextDataDatagram() throws {
        var (opener, listener) = Self.keyedPair()
        listener.queue(.dataAck(.init(cumulativeAck: 0, window: 1 << 20)))
        let dataAck = Self.drain(&listener, now: 1_000_000)
        #expect(dataAck.count == 1 && listener.hasAckElicitingInFlight)
        _ = opener.receive(dataAck[0], now: 2_000_000)
        #expect(Self.drain(&opener, now: 2_000_000).isEmpty, "no ACK of its own at once")
        opener.queueData(sequence: 0, payload: ByteBuffer(repeating: 1, count: 1000))
        let data = Self.drain(&opener, now: 3_000_000)
        #expect(data.count == 1)
        for d in data { _ = listener.receive(d, now: 4_000_000) }
        #expect(!listener.hasAckElicitingInFlight, "the DATA datagram acknowledged the DATA_ACK")

        // With nothing to send, the ACK goes alone within the ack delay.
        listener.queue(.dataAck(.init(cumulativeAck: 1000, window: 1 << 20)))
        for d in Self.drain(&listener, now: 5_000_000) { _ = opener.receive(d, now: 6_000_000) }
        #expect(Self.drain(&opener, now: 6_000_000).isEmpty)
        _ = opener.timeout(now: 6_000_000 + opener.maxAckDelay)
        let ack = Self.drain(&opener, now: 6_000_000 + opener.maxAckDelay)
        #expect(ack.count == 1)
        for d in ack { _ = listener.receive(d, now: 17_000_000) }
        #expect(!listener.hasAckElicitingInFlight)
    }

    @Test func silenceCountsFromTheOldestUnansweredPacketNotTheLastAck() throws {
        var (opener, listener) = Self.keyedPair()
        opener.queue(.dataAck(.init(cumulativeAck: 0, window: 100)))
        for d in Self.drain(&opener, now: 1_000_000) { _ = listener.receive(d, now: 1_500_000) }
        _ = listener.timeout(now: 20_000_000)  // its ACK goes out at the ack delay
        for d in Self.drain(&listener, now: 20_000_000) { _ = opener.receive(d, now: 21_000_000) }
        #expect(!opener.hasAckElicitingInFlight)
        #expect(opener.silentSince == 21_000_000, "nothing owed: the last ACK")
        let probeAt: UInt64 = 8_000_000_000  // eight idle seconds later
        opener.queue(.probe(.init(identifier: 1)))
        #expect(Self.drain(&opener, now: probeAt).count == 1)
        #expect(opener.silentSince == probeAt, "owed since the probe went out, not since the ACK eight seconds ago")
    }

    /// Each ack-eliciting packet re-arms the probe timer: a PROBE every second on a path whose probe
    /// timeout is longer kept it from ever firing, and the session's stall check, which asks for a
    /// timeout, never suspended the dead subflow (the debug UDP soak, seed 31337).
    @Test func anAcknowledgementIsOverdueThoughLaterPacketsKeepThePTOFromFiring() throws {
        var (opener, listener) = Self.keyedPair()
        // An RTT sample of 2 s: a probe timeout of about 3 s.
        opener.queue(.probe(.init(identifier: 0)))
        for d in Self.drain(&opener, now: 0) { _ = listener.receive(d, now: 1_000_000_000) }
        _ = listener.timeout(now: 1_010_000_000)
        for d in Self.drain(&listener, now: 1_010_000_000) { _ = opener.receive(d, now: 2_000_000_000) }
        #expect(!opener.hasAckElicitingInFlight)
        #expect(!opener.acknowledgementOverdue(now: 2_000_000_000))
        let timeout = opener.rtt.probeTimeout(maxAckDelay: opener.maxAckDelay)
        // Then the path dies: a PROBE a second, none answered.
        let start: UInt64 = 3_000_000_000
        var now = start
        while now < start + 3 * timeout {
            opener.queue(.probe(.init(identifier: now)))
            _ = Self.drain(&opener, now: now)
            if let due = opener.nextTimeout, due <= now { _ = opener.timeout(now: now) }
            now += 1_000_000_000
        }
        #expect(opener.probeTimeouts == 0, "each PROBE pushed the timer on")
        #expect(opener.acknowledgementOverdue(now: now))
        #expect(!opener.acknowledgementOverdue(now: start + timeout / 2), "not before a probe timeout has passed")
    }

    // MARK: a simulated path

    /// A one-way path: a drop-tail queue drained at `rate`, then `delay`; optional random loss.
    struct Path {
        var rate: Double  // bytes per second
        var delay: UInt64
        var queueLimit: Int
        var loss: Double = 0
        var busyUntil: UInt64 = 0
        var queued: [(at: UInt64, size: Int)] = []
        var dropped = 0

        /// When `datagram` arrives, or nil if it is dropped.
        mutating func carry(_ size: Int, now: UInt64, rng: inout SplitMix64) -> UInt64? {
            queued.removeAll { entry in entry.at <= now }
            let backlog = queued.reduce(0) { $0 + $1.size }
            if backlog + size > queueLimit || rng.chance(loss) {
                dropped += 1
                return nil
            }
            let start = max(now, busyUntil)
            busyUntil = start + UInt64(Double(size) / rate * 1e9)
            queued.append((busyUntil, size))
            return busyUntil + delay
        }
    }

    /// One sender's session-level behaviour: DATA for `total` bytes, resent when a datagram
    /// carrying it is lost, plus ordered control frames; the receiver checks what arrives.
    struct Flow {
        var sender: DatagramConnection
        var receiver: DatagramConnection
        let total: Int
        var nextSequence: UInt64 = 0
        var delivered = Set<UInt64>()
        var deliveredBytes = 0
        var duplicates = 0
        var controlSent: [UInt32] = []
        var controlReceived: [UInt32] = []
        var shutdowns = 0
        var doneAt: UInt64?
        let payload = ByteBuffer(repeating: 7, count: DatagramWire.maxDataPayload(datagramSize: DatagramWire.baseDatagramSize))

        mutating func refill() {
            while sender.isWritable, Int(nextSequence) < total {
                let length = min(DatagramWire.maxDataPayload(datagramSize: DatagramWire.baseDatagramSize), total - Int(nextSequence))
                sender.queueData(sequence: nextSequence, payload: payload.getSlice(at: 0, length: length)!)
                nextSequence += UInt64(length)
            }
        }
    }

    enum Arrival { case toReceiver(Int, ByteBuffer), toSender(Int, ByteBuffer) }

    /// Runs flows over shared paths (forward and back) until every byte is delivered or the
    /// virtual clock reaches `limit`.
    static func simulate(_ flows: inout [Flow], forward: inout Path, back: inout Path, seed: UInt64, controlEvery: Int = 0,
                         limit: UInt64 = 120_000_000_000) -> UInt64 {
        var rng = SplitMix64(seed: seed)
        var now: UInt64 = 0
        var inFlight: [(at: UInt64, order: Int, arrival: Arrival)] = []
        var order = 0
        let step: UInt64 = 200_000  // 0.2 ms
        var nextControl = 0
        while now < limit {
            for i in flows.indices where flows[i].doneAt == nil {
                flows[i].refill()
                if controlEvery > 0, nextControl < 40, flows[i].nextSequence > UInt64(nextControl * controlEvery) {
                    flows[i].sender.queue(.priority(.init(backup: false, sequence: UInt32(nextControl), mac: .init(repeating: 0, count: 32))))
                    flows[i].controlSent.append(UInt32(nextControl))
                    nextControl += 1
                    if nextControl == 40 { flows[i].sender.queueShutdown() }
                }
                for conn in [true, false] {
                    var c = conn ? flows[i].sender : flows[i].receiver
                    if let t = c.nextTimeout, t <= now {
                        for case .dataLost(let s, let l) in c.timeout(now: now) {
                            c.queueData(sequence: s, payload: flows[i].payload.getSlice(at: 0, length: l)!)
                        }
                    }
                    while case .datagram(let d) = c.nextDatagram(now: now) {
                        let arrival = conn ? forward.carry(d.readableBytes, now: now, rng: &rng) : back.carry(d.readableBytes, now: now, rng: &rng)
                        if let at = arrival {
                            inFlight.append((at, order, conn ? .toReceiver(i, d) : .toSender(i, d)))
                            order += 1
                        }
                    }
                    if conn { flows[i].sender = c } else { flows[i].receiver = c }
                }
            }
            inFlight.sort { ($0.at, $0.order) < ($1.at, $1.order) }
            while let first = inFlight.first, first.at <= now {
                inFlight.removeFirst()
                switch first.arrival {
                case .toReceiver(let i, let d):
                    for event in flows[i].receiver.receive(d, now: now).events {
                        switch event {
                        case .frame(.data(let data)):
                            if flows[i].delivered.insert(data.sequence).inserted {
                                flows[i].deliveredBytes += data.payload.readableBytes
                            } else {
                                flows[i].duplicates += 1
                            }
                        case .frame(.priority(let p)): flows[i].controlReceived.append(p.sequence)
                        case .peerShutdown: flows[i].shutdowns += 1
                        default: break
                        }
                    }
                case .toSender(let i, let d):
                    for case .dataLost(let s, let l) in flows[i].sender.receive(d, now: now).events { resend(&flows[i], s, l) }
                }
            }
            for i in flows.indices where flows[i].doneAt == nil && flows[i].deliveredBytes == flows[i].total {
                flows[i].doneAt = now
            }
            if flows.allSatisfy({ $0.doneAt != nil }) { break }
            now += step
        }
        return now
    }

    static func resend(_ flow: inout Flow, _ sequence: UInt64, _ length: Int) {
        flow.sender.queueData(sequence: sequence, payload: flow.payload.getSlice(at: 0, length: length)!)
    }

    static func flow(_ id: UInt64, bytes: Int) -> Flow {
        var sender = DatagramConnection(connectionID: id, isOpener: true)
        var receiver = DatagramConnection(connectionID: id, isOpener: false)
        _ = sender.installKeys(send: openerKey, receive: listenerKey, now: 0)
        _ = receiver.installKeys(send: listenerKey, receive: openerKey, now: 0)
        return Flow(sender: sender, receiver: receiver, total: bytes)
    }

    @Test(arguments: [1, 2, 3])
    func everyByteArrivesOnceAndControlFramesInOrderOverALossyPath(seed: UInt64) {
        var flows = [Self.flow(1, bytes: 2 << 20)]
        var forward = Path(rate: 2_500_000, delay: 10_000_000, queueLimit: 64 * 1024, loss: 0.03)
        var back = Path(rate: 2_500_000, delay: 10_000_000, queueLimit: 64 * 1024, loss: 0.03)
        let end = Self.simulate(&flows, forward: &forward, back: &back, seed: seed, controlEvery: 40_000)
        let flow = flows[0]
        #expect(flow.deliveredBytes == flow.total, "delivered \(flow.deliveredBytes) of \(flow.total) in \(end / 1_000_000) ms")
        #expect(flow.controlReceived == flow.controlSent, "control frames once each, in order")
        #expect(flow.shutdowns == 1)
        #expect(flow.sender.statistics.lostPackets > 0, "the path lost nothing: the test tested nothing")
        // 2 MiB at 20 Mbit/s is 0.84 s; with 3 % loss both ways, NewReno should still move it in a few seconds.
        #expect(end < 20_000_000_000)
    }

    @Test func twoFlowsShareABottleneckFairly() {
        var flows = [Self.flow(1, bytes: 6 << 20), Self.flow(2, bytes: 6 << 20)]
        // 10 Mbit/s, 20 ms each way, a queue of 50 ms: tbf on the namespace paths, roughly.
        var forward = Path(rate: 1_250_000, delay: 20_000_000, queueLimit: 62_500)
        var back = Path(rate: 1_250_000, delay: 20_000_000, queueLimit: 62_500)
        _ = Self.simulate(&flows, forward: &forward, back: &back, seed: 4, limit: 7_000_000_000)
        // Three seconds in, with both still sending, each should have about half.
        let a = Double(flows[0].deliveredBytes)
        let b = Double(flows[1].deliveredBytes)
        let share = min(a, b) / max(a, b)
        #expect(share > 0.5, "shares \(Int(a)) and \(Int(b))")
        let utilisation = (a + b) / (1_250_000 * 7)
        #expect(utilisation > 0.8, "the pair used \(Int(utilisation * 100)) % of the bottleneck")
        #expect(forward.dropped > 0, "NewReno finds the bottleneck by its drops")
    }
}

