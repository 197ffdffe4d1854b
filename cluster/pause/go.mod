module imgpipe.local/cluster/pause

go 1.25
