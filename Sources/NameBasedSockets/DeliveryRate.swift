import NIOCore

/// What a TCP subflow's path has delivered lately, in bytes per second: the best rate of newly
/// acknowledged bytes (tcpi_bytes_acked) between two observations over the last `window`, as BBR
/// keeps its bandwidth estimate (a windowed maximum, Linux lib/win_minmax.c, kept exactly here).
/// A subflow we left short of data reads low, which the maximum forgets once it is busy again.
///
/// The two estimates the kernel offers both read high here, by a hundred times. Window ÷ RTT did
/// on a subflow with nothing queued in the network, whose RTT is the bare link's: an idle standby
/// that became a carrier. The kernel's own delivery-rate sample (tcpi_delivery_rate, with its
/// application-limited mark) did on busy subflows of the failover bench, 30 to 370 MB/s on a
/// 10 Mbit/s path for a few hundred ms, window ÷ RTT with it. A carrier then took up to a second
/// of its path's rate into its queues, and reinjected data and the receiver's next bytes waited
/// behind them. Acknowledged bytes err high only by a cumulative ACK that jumps over a repaired
/// loss; measured over at least `minimumInterval`, such a jump weighs less.
struct DeliveryRate {
    struct Sample {
        var bytesPerSecond: Double
        var at: UInt64
    }

    let window: UInt64
    /// Falls in rate and rises in time: each sample is the best since the one before it, so when
    /// the best leaves the window the estimate falls to the next best, not to nothing.
    private var best: [Sample] = []
    private var last: (bytesAcked: UInt64, at: UInt64)?

    init(window: TimeAmount = .seconds(1)) {
        self.window = UInt64(window.nanoseconds)
    }

    /// nil until two observations `minimumInterval` apart.
    var bytesPerSecond: Double? { best.first?.bytesPerSecond }

    /// Observations closer than this are merged into the next interval: over a few milliseconds a
    /// rate is mostly the timing of the ACKs. Shorter (40 ms, and a first sample from the
    /// subflow's establishment) let start-up losses on a 10 Mbit/s path read as 8 MB/s, and the
    /// link-down bench stalled 170-500 ms in 1 to 4 of 16 trials, against none in 31 with this.
    static let minimumInterval: UInt64 = 100_000_000

    /// `bytesAcked`: the transport's running count; `now` in nanoseconds, never earlier than the
    /// last call's.
    mutating func observe(bytesAcked: UInt64, at now: UInt64) {
        guard let last, bytesAcked >= last.bytesAcked else {
            self.last = (bytesAcked, now)
            return
        }
        guard now >= last.at + Self.minimumInterval else { return }
        self.last = (bytesAcked, now)
        let sample = Double(bytesAcked - last.bytesAcked) * 1e9 / Double(now - last.at)
        while let oldest = best.first, now - oldest.at > window { best.removeFirst() }
        while let newest = best.last, newest.bytesPerSecond <= sample { best.removeLast() }
        best.append(Sample(bytesPerSecond: sample, at: now))
    }
}
